"""Prompt-ensemble text features: a word's feature is the normalised mean of 85 templates.

The templates are the ImageNet-style set the CLIP Surgery code uses. Features are
cached per (model, word), because the same words recur across thousands of images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.tokens import tokenize

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


@torch.no_grad()
def prompt_ensemble(model: torch.nn.Module, words: list[str], cache: dict | None = None) -> torch.Tensor:
    """Unit text features ``[T, D]`` of ``words``, each the mean over the 85 templates.

    Args:
        model: a stock openai-clip ``CLIP``.
        words: the texts to embed.
        cache: optional ``{word: feature}`` for this model; missing words are added.

    Shape:
        - Output: :math:`(T, D)`, float32, unit rows, on the model's device.
    """
    cache = {} if cache is None else cache
    todo = [w for w in dict.fromkeys(words) if w not in cache]
    if todo:
        device = model.positional_embedding.device
        ctx = model.positional_embedding.shape[0]
        ids = tokenize([t.format(w) for w in todo for t in TEMPLATES], ctx).to(device)
        feats = []
        for start in range(0, len(ids), 1024):
            feats.append(F.normalize(model.encode_text(ids[start : start + 1024]).float(), dim=-1))
        per_word = torch.cat(feats).view(len(todo), len(TEMPLATES), -1).mean(1)
        for w, f in zip(todo, F.normalize(per_word, dim=-1)):
            cache[w] = f
    return torch.stack([cache[w] for w in words]) if words else torch.empty(0)
