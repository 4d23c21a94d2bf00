"""pipeline.heatmaps: the original's point rule, safe label slugs, one drawing function, the method list."""

import numpy as np
import pytest
import torch

from pipeline.heatmaps.draw import label_slug, map_to_points, overlay_heatmap, upsample_map


def test_points_follow_the_original_rule():
    m = torch.zeros(8, 8)
    m[0:2, 0:2] = 1.0  # one hot 2x2 cell after downsampling by 2
    m[6:8, 6:8] = 0.2
    pts, labels = map_to_points(m, (100, 200))
    assert labels == [1, 0] and pts[0] == [int(0.5 * 200 / 4), int(0.5 * 100 / 4)]
    m = torch.arange(64, dtype=torch.float32).reshape(8, 8)  # 16 cells; >= 0.8 after normalising: 4 of them
    pts, labels = map_to_points(m, (64, 64), threshold=0.8)
    assert labels == [1] * 4 + [0] * 4
    assert pts[0] == [56, 56] and pts[4] == [8, 8]  # strongest positive and weakest negative first
    pts, labels = map_to_points(torch.ones(8, 8), (64, 64))
    assert pts == [] and labels == []
    pts, _ = map_to_points(torch.rand(8, 8, generator=torch.Generator().manual_seed(0)), (64, 64), threshold=0.01)
    assert len(pts) == 16  # never more than half the cells each


def test_label_slug_never_escapes_and_never_collides():
    words = ["../../etc/passwd", "a/b", "a_b", "ünïcødé", "..", "", "word", "Word", "x" * 300, "/abs"]
    slugs = [label_slug(w) for w in words]
    assert len(set(slugs)) == len(words)
    for s in slugs:
        assert "/" not in s and "\\" not in s and not s.startswith(".") and s.isascii() and 0 < len(s) <= 49
    assert label_slug("word") == "word"


def test_overlay_is_jet_over_the_image():
    img = np.full((4, 5, 3), 100, np.uint8)
    heat = np.zeros((4, 5))
    heat[0, 0] = 1
    out = overlay_heatmap(img, heat)
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > out[0, 0, 2] and out[1, 1, 2] > out[1, 1, 0]  # hot is red, cold is blue
    with pytest.raises(ValueError):
        overlay_heatmap(img, np.zeros((3, 3)))


def test_upsampled_map_keeps_its_range_and_peak():
    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 1.0
    big = upsample_map(grid, (40, 40))
    assert big.shape == (40, 40) and 0 <= big.min() and big.max() <= 1
    y, x = np.unravel_index(int(np.argmax(big)), big.shape)
    assert 10 <= y < 20 and 20 <= x < 30  # inside the hot cell
