"""stages.surgery: maps that land on toy objects, drawing, and the files the stage writes."""

import numpy as np

from pipeline.heatmaps.compute import HeatmapResult, draw_heatmaps
from stages.surgery import SurgeryConfig
from tests.benchmarks.toyeval import evaluate_localization, held_out_scenes


def test_surgery_maps_point_at_the_named_object(toy):
    """On held-out two-object toy scenes, each object's shape-word map is scored against its true mask:
    its peak falls inside that object, not the other one or the background, at the demo's depth."""
    scores = evaluate_localization(toy, held_out_scenes(40, objects=2), SurgeryConfig(surgery_depth=3, single_resolution=64))
    assert scores["raw"]["objects"] == 80
    for m, floor in (("surgery", 0.75), ("single", 0.8)):
        assert scores[m]["pointing"] >= floor, scores
        assert scores[m]["contrast"] > 0.1 and scores[m]["auroc"] > 0.7, scores


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


def test_windows_tile_at_half_stride_and_stitch_back():
    import torch

    from pipeline.heatmaps.compute import stitch_windows, window_offsets

    assert window_offsets(64, 64) == [(0, 0)]
    starts = [0, 32, 64, 96, 128, 136]  # half-window stride, the last flush with the edge
    assert window_offsets(200, 64) == [(y, x) for y in starts for x in starts]
    # two windows' similarities of a 4x4 grid (16 px cells) over a 64x96 strip, stitched by averaging
    wins = [(0, 0), (0, 32)]
    sim = torch.zeros(2, 1 + 16, 1)
    sim[0, 1:, 0], sim[1, 1:, 0] = 1.0, 3.0
    got, grid = stitch_windows(sim, wins, (4, 4), side=96, window=64)
    assert grid == (6, 6)
    rows = got.reshape(6, 6)[0]
    assert rows.tolist() == [1, 1, 2, 2, 3, 3]  # the overlap averages both windows


def test_windowed_maps_cover_the_whole_image(toy):
    import torch

    from pipeline.run.images import normalize
    from pipeline.model.prompts import prompt_ensemble
    from pipeline.heatmaps.compute import compute_heatmaps

    scene = held_out_scenes(1, objects=2)[0]
    image = torch.from_numpy(scene.image).permute(2, 0, 1).float()[None] / 255
    big = normalize(torch.nn.functional.interpolate(image, size=(128, 128), mode="bilinear"))
    words = [o.shape for o in scene.objects]
    with torch.inference_mode():
        text, empty = prompt_ensemble(toy.model, words), prompt_ensemble(toy.model, [""])[0]
        res = compute_heatmaps(toy.model, big, None, [words], words, text, empty, [(64, 64)],
                               SurgeryConfig(methods=("raw", "surgery", "clearclip"), window_side=128, surgery_depth=2))
    cells = 128 // toy.model.visual.conv1.kernel_size[0]  # 3x3 windows of the model's grid, stitched over 128 px
    for m in ("raw", "surgery", "clearclip"):
        assert res[0].maps[m].shape == (2, cells, cells)
        assert 0 <= res[0].maps[m].min() and res[0].maps[m].max() <= 1


def test_benchmark_mask_scores_on_known_maps():
    import numpy as np

    from tests.benchmarks.toyeval import localization_scores

    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    perfect = localization_scores(mask.astype(float), mask)
    assert perfect["auroc"] == 1.0 and perfect["mass"] == 1.0 and perfect["pointing"] == 1.0
    inverted = localization_scores(1.0 - mask, mask)
    assert inverted["auroc"] == 0.0 and inverted["mass"] == 0.0
    flat = localization_scores(np.full((8, 8), 0.3), mask)
    assert flat["auroc"] == 0.5 and abs(flat["mass"] - 4 / 64) < 1e-9


def test_each_map_records_the_similarities_its_0_and_1_stand_for(toy):
    import torch
    import torch.nn.functional as F

    from pipeline.run.images import normalize
    from pipeline.model.prompts import prompt_ensemble
    from pipeline.heatmaps.blocks import encode_image_tokens
    from pipeline.heatmaps.compute import compute_heatmaps

    scene = held_out_scenes(1, objects=2)[0]
    x = normalize(torch.from_numpy(scene.image).permute(2, 0, 1).float()[None] / 255)
    words = [o.shape for o in scene.objects]
    with torch.inference_mode():
        text, empty = prompt_ensemble(toy.model, words), prompt_ensemble(toy.model, [""])[0]
        res = compute_heatmaps(toy.model, x, None, [words], words, text, empty, [(64, 64)],
                               SurgeryConfig(methods=("raw", "surgery"), surgery_depth=2))[0]
        raw = F.normalize(encode_image_tokens(toy.model, x, 2).raw[0, 1:].float(), dim=-1) @ text.float().T  # [N, T]
    for t in range(len(words)):
        lo, hi = res.ranges["raw"][t]
        assert abs(lo - raw[:, t].min().item()) < 1e-4 and abs(hi - raw[:, t].max().item()) < 1e-4
        assert res.ranges["surgery"][t][0] < res.ranges["surgery"][t][1]
