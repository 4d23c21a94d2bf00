"""stages.surgery: maps that land on toy objects, drawing, and the files the stage writes."""

import numpy as np

from stages.surgery import HeatmapResult, SurgeryConfig, draw_heatmaps
from tests.benchmarks.toyeval import evaluate_localization, held_out_scenes


def test_surgery_maps_find_objects_that_raw_clip_misses(toy):
    """On held-out two-object toy scenes, each object's shape-word map is scored against its true mask."""
    scores = evaluate_localization(toy, held_out_scenes(40, objects=2), SurgeryConfig(surgery_depth=2, single_resolution=64))
    assert scores["raw"]["objects"] == 80
    for m in ("surgery", "single"):
        assert scores[m]["pointing"] >= scores["raw"]["pointing"] + 0.2, scores
        assert scores[m]["contrast"] > 0.1, scores


def test_drawn_overlays_and_peaks_follow_each_map():
    image = np.full((32, 48, 3), 120, np.uint8)
    hot = np.zeros((1, 4, 4), np.float32)
    hot[0, 3, 0] = 1.0  # bottom-left cell
    hm = HeatmapResult(words=["w"], maps={"raw": hot, "surgery": hot[:, ::-1].copy()}, points=[([], [])])
    drawn = draw_heatmaps(image, hm, ("surgery", "raw"), max_side=24)
    assert drawn.display.shape == (16, 24, 3)
    assert drawn.overlays[0]["raw"].shape == (16, 24, 3) and list(drawn.overlays[0]) == ["surgery", "raw"]
    assert drawn.peaks[0]["raw"] == [0.125, 0.875] and drawn.peaks[0]["surgery"] == [0.125, 0.125]
    red = drawn.overlays[0]["raw"][..., 0].astype(int) - drawn.overlays[0]["raw"][..., 2]
    assert red[-1, 0] > 0 > red[0, -1]  # hot where the map peaks, cold elsewhere
