"""naclip: k-k attention plus a Gaussian neighbourhood in the last block, alone (Hajimiri et al., WACV 2025)."""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import LastBlock, LastBlockMethod
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")


def naclip_attention(last: LastBlock) -> torch.Tensor:
    """``softmax(s k kᵀ + Ω)`` ``[B, heads, N, N]``, Ω the neighbourhood over grid distance, 0 on the class token."""
    return (last.scale * last.k @ last.k.transpose(-1, -2) + last.neighbourhood).softmax(-1)


@register
class NaClip(LastBlockMethod):
    name = "naclip"
    title = "NACLIP"
    summary = ("NACLIP (Hajimiri et al., WACV 2025): last block is `softmax(k kᵀ + Ω)` alone, Ω a Gaussian over grid "
               "distance (`naclip_sigma`)")
    prefer = "objects that are compact: neighbours vote together"
    params = ("naclip_sigma",)
    mode = "replace"
    equation = "softmax(s k kᵀ + Ω)"

    def attention(self, last: LastBlock) -> torch.Tensor:
        return naclip_attention(last)
