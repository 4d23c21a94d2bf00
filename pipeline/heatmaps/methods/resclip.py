"""resclip: ResCLIP's residual cross-correlation on NACLIP (Yang et al., CVPR 2025).

NACLIP's attention mixed 0.7 / 0.3 with the mean stock attention ``softmax(s q kᵀ)`` of the middle
blocks (0-based 5..8 of 12, scaled to the model's depth), times 2.
"""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import LastBlock, LastBlockMethod
from pipeline.heatmaps.methods.naclip import naclip_attention
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")


def resclip_blocks(layers: int) -> range:
    """The blocks whose stock attention ResCLIP averages: 0-based 5..8 of 12, scaled to ``layers``."""
    first, stop = round(5 * layers / 12), round(9 * layers / 12)
    return range(min(first, layers - 2), max(min(stop, layers - 1), min(first, layers - 2) + 1))


@register
class ResClip(LastBlockMethod):
    name = "resclip"
    title = "ResCLIP"
    summary = ("ResCLIP's RCS on NACLIP (Yang et al., CVPR 2025): NACLIP's attention mixed 0.7/0.3 with the mean stock "
               "attention of the middle blocks")
    prefer = "the best published figures below"
    params = ("naclip_sigma",)
    mode = "replace"
    equation = "2 [0.7 A_naclip + 0.3 mean of the middle blocks' softmax(s q kᵀ)]"

    def recorded_blocks(self, layers: int) -> range:
        return resclip_blocks(layers)

    def attention(self, last: LastBlock) -> torch.Tensor:
        return 2 * (0.7 * naclip_attention(last) + 0.3 * last.recorded)
