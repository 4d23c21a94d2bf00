"""raw: stock CLIP's own tokens, every position through the same projection as the class token."""

from __future__ import annotations

from pipeline.lazy import lazy_module
from pipeline.heatmaps.base import HeatmapMethod, MapSettings, PoolStep, VitRun
from pipeline.heatmaps.registry import register

torch = lazy_module("torch")


@register
class Raw(HeatmapMethod):
    name = "raw"
    title = "raw CLIP"
    summary = "nothing: stock CLIP's tokens"
    prefer = 'as the reference; on real CLIP it tends to light up the background ("opposite visualization")'
    backends = ("vit", "resnet")
    feature_surgery = "off"  # plain cosine, as the original draws raw CLIP

    def vit_tokens(self, run: VitRun) -> torch.Tensor:
        return run.project(run.x)

    def resnet_tokens(self, pool: PoolStep, settings: MapSettings) -> torch.Tensor:
        return pool.raw  # the stock q-k pool at every position; token 0 is encode_image
