"""CLIP Surgery, training-free: v-v attention with a dual path, and feature surgery.

Li et al., "CLIP Surgery for Better Explainability with Enhancement in
Open-Vocabulary Tasks" (2023), arXiv:2304.05653.

This module wraps a *stock* CLIP model of either backend (``pipeline.adapter``). It reads
the model's parameters and calls its own submodules; it never copies, swaps or mutates
them. The positional embedding is interpolated into a local tensor for other input
sizes, and the caller chooses the grad mode. The blocks run on the one block runner
of ``pipeline.maps``, which every heatmap method shares.

* ViT: the last ``surgery_depth`` blocks run two paths from the same input. The
  original path is the stock block; the surgery path adds v-v attention of the
  original path's ``ln_1`` output and skips the MLP. Both attentions run in one
  ``scaled_dot_product_attention`` call. Token 0 comes from the original path, and
  ``ln_post`` and ``proj`` are applied to every token.
* ModifiedResNet (RN50 ...): the attention pool becomes plain v-v attention, as the
  paper's released code runs it (the normalised-key, 8x-scale branch it carries but
  never switches on is ``resnet_surgery="normalised"``); its ``c_proj`` is the projection. Token 0 is
  the mean token through the stock q-k pool, i.e. exactly ``encode_image``. Any
  ``surgery_depth >= 1`` turns the pool's surgery on; 0 gives the raw tokens.

Raw tokens are the stock model's tokens with the same projection applied to all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.maps import encode_method_tokens
from pipeline.prompts import prompt_ensemble

__all__ = ["ImageTokens", "encode_image_tokens", "feature_surgery", "prompt_ensemble", "similarity_map", "grid_shape"]


@dataclass(frozen=True)
class ImageTokens:
    """Projected image tokens of one forward, not normalised.

    ``raw`` and ``surgery`` are ``[B, 1 + gh * gw, D]``; token 0 is the class token
    (the same in both), then the patches in row-major order of the ``grid``.
    """

    raw: torch.Tensor
    surgery: torch.Tensor
    grid: tuple[int, int]


def encode_image_tokens(model: nn.Module, images: torch.Tensor, surgery_depth: int = 6,
                        resnet_surgery: str = "official") -> ImageTokens:
    """Raw and surgery image tokens of stock CLIP in one forward, at any input size.

    The first ``L - surgery_depth`` ViT blocks are shared by both paths. A depth
    larger than the number of blocks means every block; 0 gives the raw tokens.

    Args:
        model: a stock openai-clip or OpenCLIP ``CLIP`` (or its ``visual``, or its adapter), ViT or ModifiedResNet.
        images: CLIP-normalised images. Sides need not match the model's resolution.
        surgery_depth: how many of the last blocks run the dual path.
        resnet_surgery: ResNet only: ``"official"``, plain v-v attention as the released code runs it,
            or ``"normalised"``, L2-normalised keys with 8x the scale (the code's unused branch).

    Shape:
        - images: :math:`(B, 3, H, W)`.
        - Output: ``raw`` and ``surgery`` :math:`(B, 1 + gh \\cdot gw, D)`, with
          ``grid = (H // patch, W // patch)`` for ViT and ``(H / 32, W / 32)`` for ResNet.

    Example:
        >>> tokens = encode_image_tokens(model, normalize(images), surgery_depth=6)
        >>> tokens.raw[:, 0]  # equals model.encode_image(normalize(images)) at the model's resolution
    """
    if surgery_depth < 0:
        raise ValueError(f"surgery_depth must be >= 0, got {surgery_depth}")
    out = encode_method_tokens(model, images, ("raw", "surgery") if surgery_depth else ("raw",), surgery_depth,
                               resnet_surgery=resnet_surgery)
    raw = out.tokens["raw"]
    return ImageTokens(raw=raw, surgery=out.tokens.get("surgery", raw), grid=out.grid)


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
