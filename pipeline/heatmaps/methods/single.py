"""single: CLIP Surgery's tokens of the image at ``single_resolution``, one label at a time, minus the empty prompt."""

from __future__ import annotations

from pipeline.heatmaps.base import HeatmapMethod
from pipeline.heatmaps.registry import register


@register
class Single(HeatmapMethod):
    name = "single"
    title = "single-text surgery"
    summary = "`surgery` at `single_resolution`, one label at a time, minus the empty prompt's feature"
    prefer = "one word at a time, at a finer grid"
    backends = ("vit", "resnet")
    params = ("single_resolution", "surgery_depth", "resnet_surgery")
    input = "single"
    source = "surgery"
    feature_surgery = "single"
