"""clearclip: the last block is q-q attention alone, with no residual and no MLP (Lan et al., ECCV 2024)."""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import LastBlock, LastBlockMethod
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")


@register
class ClearClip(LastBlockMethod):
    name = "clearclip"
    title = "ClearCLIP"
    summary = "ClearCLIP (Lan et al., ECCV 2024): last block is `softmax(q qᵀ)` attention alone, with no residual and no MLP"
    prefer = "a simple, strong default on any ViT size"
    mode = "replace"
    equation = "softmax(s q qᵀ)"

    def attention(self, last: LastBlock) -> torch.Tensor:
        return (last.scale * last.q @ last.q.transpose(-1, -2)).softmax(-1)
