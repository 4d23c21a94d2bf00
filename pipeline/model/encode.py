"""Model helpers the stages share: decoding a batch of images for the model, encoding them, re-scoring texts.

Every function takes the loaded model and tensors, returns tensors, and leaves the
grad mode to the caller (the stages call them under ``torch.no_grad``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.run.images import ImageError, ImageRef, load_image, normalize, to_tensor
from pipeline.model.load import LoadedModel
from pipeline.model.tokens import tokenize


def load_batch(resolution: int, refs: list[ImageRef], max_side: int) -> tuple[list[ImageRef], torch.Tensor | None, dict[str, str]]:
    """Decode a batch at the model's input ``resolution`` (CPU only, so it may run beside the model).

    Returns:
        The refs that decoded, their ``[B, 3, R, R]`` tensors in [0, 1] (``None`` when
        none did), and ``{id: reason}`` for the rest.
    """
    ok, tensors, failed = [], [], {}
    for ref in refs:
        try:
            tensors.append(to_tensor(load_image(ref.path, max_side=max_side), resolution))
            ok.append(ref)
        except ImageError as err:
            failed[ref.id] = f"{ref.rel}: {err}"
    return ok, (torch.stack(tensors) if tensors else None), failed


def encode_images(lm: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    """Unit stock-CLIP features of un-augmented images.

    Shape:
        - images: :math:`(B, 3, R, R)` in [0, 1]; Output: :math:`(B, D)` float32.
    """
    f = lm.clip.encode_image(normalize(images.to(lm.device)).to(lm.dtype)).float()
    return F.normalize(f, dim=-1)


def rescore_texts(lm: LoadedModel, texts: list[str], image_features: torch.Tensor) -> torch.Tensor:
    """Cosine of stock ``encode_text(tokenize(text))`` with each text's own image feature.

    Shape:
        - image_features: :math:`(N, D)`, one row per text; Output: :math:`(N,)` on the CPU.
    """
    ctx_len = lm.clip.context_length
    ids = tokenize(texts, ctx_len).to(lm.device)
    f = F.normalize(lm.clip.encode_text(ids).float(), dim=-1)
    return (f * image_features).sum(-1).cpu()
