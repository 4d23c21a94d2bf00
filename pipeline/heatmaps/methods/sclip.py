"""sclip: correlative self-attention in the last block, keeping its residual and MLP (Wang et al., ECCV 2024)."""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import LastBlock, LastBlockMethod
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")


@register
class SClip(LastBlockMethod):
    name = "sclip"
    title = "SCLIP"
    summary = "SCLIP (Wang et al., ECCV 2024): last block attends by `softmax(q qᵀ) + softmax(k kᵀ)`, keeping the residual and MLP"
    prefer = "ViT-B; methods that keep the residual collapse on ViT-L/14 in the published figures"
    mode = "residual"
    equation = "softmax(s q qᵀ) + softmax(s k kᵀ)"

    def attention(self, last: LastBlock) -> torch.Tensor:
        q, k, s = last.q, last.k, last.scale
        return (s * q @ q.transpose(-1, -2)).softmax(-1) + (s * k @ k.transpose(-1, -2)).softmax(-1)
