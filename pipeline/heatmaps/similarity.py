"""Similarity of image tokens to label features, and maps from similarity: CLIP Surgery's feature surgery.

Li et al., "CLIP Surgery for Better Explainability with Enhancement in Open-Vocabulary Tasks" (2023),
arXiv:2304.05653. ``feature_surgery`` removes the features common to all labels; ``similarity_map``
turns similarities into per-label maps in [0, 1].
"""

from __future__ import annotations

import math

from pipeline.lazy import lazy_module

torch = lazy_module("torch")
F = lazy_module("torch.nn.functional")


def feature_surgery(image_tokens: torch.Tensor, text_features: torch.Tensor,
                    redundant: torch.Tensor | None = None, temperature: float = 2.0) -> torch.Tensor:
    """Similarity of every token to every text, with the features common to all texts removed.

    Both inputs are L2-normalised here. With ``redundant`` (the single-text form),
    ``s = token . (text - redundant)``; each text's column is independent, so many
    single texts can go in one call. Without it (two or more texts), with
    ``p = softmax(temperature * cls . text)`` and ``w = p / mean(p)``:
    ``s_t = w_t (token . text_t) - mean_t' w_t' (token . text_t')``. This equals the
    original's element-wise form without its ``[B, N, T, C]`` tensor, and is right
    for B > 1.

    Args:
        image_tokens: projected tokens, class token first (``ImageTokens.raw`` or ``.surgery``).
        text_features: one feature per text.
        redundant: ``[D]``, ``[1, D]`` or ``[T, D]`` feature to subtract, e.g. the empty string's.
        temperature: the softmax temperature of the class-token weights.

    Shape:
        - image_tokens: :math:`(B, N, D)`; text_features: :math:`(T, D)`.
        - Output: :math:`(B, N, T)`, float32.
    """
    if image_tokens.ndim != 3 or text_features.ndim != 2 or image_tokens.shape[-1] != text_features.shape[-1]:
        raise ValueError(f"expected image_tokens [B, N, D] and text_features [T, D], "
                         f"got {tuple(image_tokens.shape)} and {tuple(text_features.shape)}")
    tokens = F.normalize(image_tokens.float(), dim=-1)  # [B, N, D]
    text = F.normalize(text_features.float().to(tokens.device), dim=-1)  # [T, D]
    if redundant is not None:
        r = redundant.float().to(tokens.device).reshape(-1, text.shape[-1])  # [1 or T, D]
        return tokens @ (text - r).T
    sim = tokens @ text.T  # [B, N, T]
    p = (temperature * sim[:, :1, :]).softmax(dim=-1)  # [B, 1, T]
    weighted = sim * (p / p.mean(dim=-1, keepdim=True))
    return weighted - weighted.mean(dim=-1, keepdim=True)


def grid_shape(tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int, bool]:
    """``(gh, gw, has_class_token)`` for ``tokens`` tokens: a square grid, with or without a class token first."""
    if grid is not None:
        gh, gw = grid
        if tokens not in (gh * gw, gh * gw + 1):
            raise ValueError(f"{tokens} tokens do not fit a {gh}x{gw} grid")
        return gh, gw, tokens == gh * gw + 1
    side = math.isqrt(tokens)
    if side * side == tokens and tokens > 1:
        return side, side, False
    side = math.isqrt(tokens - 1)
    if side * side == tokens - 1:
        return side, side, True
    raise ValueError(f"{tokens} tokens are not a square grid (plus a class token); pass grid=(gh, gw)")


def similarity_map(sim: torch.Tensor, size: tuple[int, int], grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-text heatmaps in [0, 1] at ``size``: patches min-max normalised, then bilinearly upsampled.

    A text whose similarity is the same on every patch gets an all-zero map.

    Args:
        sim: similarities, with or without the class token first (it is dropped).
        size: ``(H, W)`` of the output; the grid size gives the maps at grid resolution.
        grid: ``(gh, gw)``; needed only for a non-square grid.

    Shape:
        - sim: :math:`(B, N, T)` with ``N = gh*gw`` or ``1 + gh*gw``.
        - Output: :math:`(B, H, W, T)`, float32.
    """
    if sim.ndim != 3:
        raise ValueError(f"sim must be [B, N, T], got {tuple(sim.shape)}")
    b, n, t = sim.shape
    gh, gw, has_cls = grid_shape(n, grid)
    if t == 0:
        return sim.new_zeros(b, *size, 0, dtype=torch.float32)
    patches = (sim[:, 1:] if has_cls else sim).float()  # [B, gh*gw, T]
    lo = patches.amin(dim=1, keepdim=True)
    span = patches.amax(dim=1, keepdim=True) - lo
    maps = torch.where(span > 0, (patches - lo) / span.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(patches))
    maps = maps.reshape(b, gh, gw, t).permute(0, 3, 1, 2)  # [B, T, gh, gw]
    if tuple(size) != (gh, gw):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    return maps.permute(0, 2, 3, 1).clamp_(0, 1)  # [B, H, W, T]
