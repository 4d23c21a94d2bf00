"""Prompt-ensemble text features: a word's feature is the normalised mean of 85 templates.

The templates are the ImageNet-style set the CLIP Surgery code uses. Features are
cached per (model, word), because the same words recur across thousands of images.
Each template is encoded over its causal prefix (``pipeline.model.textenc.encode_tokens``, a dozen
positions instead of 77): equal to stock ``encode_text`` within float rounding (2e-7), and 5-7x
cheaper on the CPU (``tests/benchmarks/textenc.py``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from pipeline.lazy import lazy_module
from pipeline.model.adapter import as_adapter
from pipeline.run.rundir import atomic_path
from pipeline.model.textenc import encode_tokens
from pipeline.model.tokens import tokenize

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")

log = logging.getLogger(__name__)

TEMPLATES: tuple[str, ...] = (
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
    'there is a {} in the scene.',
    'there is the {} in the scene.',
    'this is a {} in the scene.',
    'this is the {} in the scene.',
    'this is one {} in the scene.',
)


def prompt_ensemble(model: torch.nn.Module, words: list[str], cache: dict | None = None) -> torch.Tensor:
    """Unit text features ``[T, D]`` of ``words``, each the mean over the 85 templates.

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP``, or its adapter.
        words: the texts to embed.
        cache: optional ``{word: feature}`` for this model; missing words are added.

    Shape:
        - Output: :math:`(T, D)`, float32, unit rows, on the model's device.
    """
    cache = {} if cache is None else cache
    clip = as_adapter(model)
    todo = [w for w in dict.fromkeys(words) if w not in cache]
    if todo:
        device = clip.positional_embedding.device
        ids = tokenize([t.format(w) for w in todo for t in TEMPLATES], clip.context_length).to(device)
        feats = []
        for start in range(0, len(ids), 1024):
            feats.append(F.normalize(encode_tokens(clip, ids[start : start + 1024]).float(), dim=-1))
        per_word = torch.cat(feats).view(len(todo), len(TEMPLATES), -1).mean(1)
        for w, f in zip(todo, F.normalize(per_word, dim=-1)):
            cache[w] = f
    if not words:
        return torch.empty(0, clip.text_projection.shape[1], device=clip.positional_embedding.device)
    return torch.stack([cache[w] for w in words])


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's text weights: runs with different weights never share cached features."""
    clip = as_adapter(model)
    h = hashlib.sha1()
    for t in (clip.token_embedding.weight[::97], clip.positional_embedding, clip.text_projection):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TextFeatureStore:
    """Prompt-ensemble features per word for one model: in memory, and in shards on disk.

    Each call that computes new words writes them as one new shard (atomically), so
    a resumed run loads what an earlier run computed instead of encoding it again.
    """

    def __init__(self, model: torch.nn.Module, folder: Path | None = None):
        self.model = model
        self.folder = folder / model_fingerprint(model) if folder is not None else None
        self.features: dict[str, torch.Tensor] = {}
        self.loaded_from_disk = 0
        if self.folder is not None and self.folder.is_dir():
            device = as_adapter(model).positional_embedding.device
            for shard in sorted(self.folder.glob("*.pt")):
                try:
                    part = torch.load(shard, map_location=device, weights_only=True)
                except Exception as err:  # an unreadable shard is only a cache miss
                    log.warning("ignoring unreadable text-feature cache %s: %s", shard, err)
                    continue
                self.features.update(part)
                self.loaded_from_disk += len(part)

    def __call__(self, words: list[str]) -> torch.Tensor:
        """Unit features ``[T, D]`` of ``words`` (see ``prompt_ensemble``)."""
        todo = [w for w in dict.fromkeys(words) if w not in self.features]
        with torch.no_grad():  # stored features never carry a graph
            out = prompt_ensemble(self.model, words, self.features)
        if todo and self.folder is not None:
            name = hashlib.sha1("\0".join(todo).encode("utf-8", "surrogateescape")).hexdigest()[:16]
            with atomic_path(self.folder / f"{name}.pt") as tmp:
                torch.save({w: self.features[w].cpu() for w in todo}, tmp)
        return out
