"""Regions from maps and masks: CAM's rule, tau, multi-instance, SAM masks, IoU."""

import numpy as np
import pytest

from pipeline.labels.regions import box_iou, heatmap_regions, map_boxes, mask_region, upsample_to


def _two_blobs() -> np.ndarray:
    grid = np.zeros((8, 8), np.float32)
    grid[1:3, 1:3] = 1.0  # the strong blob, top left
    grid[5:7, 5:7] = 0.7  # a weaker one, bottom right
    return grid


def test_upsampled_map_is_min_maxed_at_image_size():
    heat = upsample_to(_two_blobs(), (48, 64))
    assert heat.shape == (48, 64) and heat.min() == 0 and heat.max() == pytest.approx(1)
    assert not upsample_to(np.full((4, 4), 0.3), (8, 8)).any()  # a flat map has no region


def test_largest_component_box_lies_on_the_strong_blob():
    (region,) = heatmap_regions(_two_blobs(), (64, 64), "single", tau=0.8)
    x, y, w, h = region.box
    assert 4 <= x <= 10 and 4 <= y <= 10 and x + w <= 26 and y + h <= 26  # cells 1..2 of 8 = pixels 8..24
    assert region.source == "single" and region.tau == 0.8 and region.peak == pytest.approx(1, abs=1e-3)
    assert region.mask is None


def test_tau_and_multi_instance_change_the_boxes():
    grid = _two_blobs()
    heat = upsample_to(grid, (64, 64))
    assert len(map_boxes(heat, 0.8, multi_instance=True)) == 1  # the weak blob is below 0.8 of the max
    both = map_boxes(heat, 0.5, multi_instance=True)
    assert len(both) == 2 and both[0][1] >= both[1][1]  # largest first
    assert both[1][2] < 0.8  # the weak blob's peak
    assert len(map_boxes(heat, 0.5, multi_instance=True, min_area=0.2)) == 1  # the small one is dropped
    low = heatmap_regions(grid, (64, 64), "raw", tau=0.05)[0]
    high = heatmap_regions(grid, (64, 64), "raw", tau=0.8)[0]
    assert low.box[2] * low.box[3] > high.box[2] * high.box[3]


def test_peak_similarity_uses_the_maps_range():
    (region,) = heatmap_regions(_two_blobs(), (32, 32), "surgery", tau=0.8, similarity_range=(0.1, 0.3))
    assert region.peak_similarity == pytest.approx(0.3, abs=1e-3)


def test_mask_region_is_the_box_around_the_mask():
    m = np.zeros((20, 30), bool)
    m[5:9, 10:21] = True
    r = mask_region(m)
    assert r.box == (10.0, 5.0, 11.0, 4.0) and r.area == 44 and r.source == "sam" and r.tau is None
    assert (r.mask == m).all()
    assert mask_region(np.zeros((4, 4), bool)) is None


def test_box_iou():
    assert box_iou((0, 0, 10, 10), np.array([[0, 0, 10, 10], [5, 0, 10, 10], [20, 20, 5, 5]])) == pytest.approx([1, 1 / 3, 0])


def test_an_evidence_prior_keeps_the_regions_inside_the_tiles_that_found_the_word():
    from pipeline.labels.regions import prior_mask

    mask = prior_mask([[0.5, 0.5, 0.5, 0.5]], (8, 8))
    assert mask.sum() == 16 and mask[4:, 4:].all()
    (free,) = heatmap_regions(_two_blobs(), (64, 64), "single", tau=0.5)
    (held,) = heatmap_regions(_two_blobs(), (64, 64), "single", tau=0.5, prior=[[0.5, 0.5, 0.5, 0.5]])
    assert free.box[0] < 16 and held.box[0] >= 32 and held.box[1] >= 32  # the weaker blob, in the bottom-right tile
    assert heatmap_regions(_two_blobs(), (64, 64), "single", tau=0.5, prior=[]) == [free]  # no tiles: no prior


def test_pamr_pulls_a_map_that_spills_over_an_edge_back_to_its_object():
    from pipeline.labels.refine import Pamr, pamr
    from pipeline.labels.regions import box_iou, heatmap_regions

    image = np.full((64, 64, 3), 120, np.uint8)
    image[20:36, 24:40] = (220, 40, 40)  # a red square, 16 px
    yy, xx = np.mgrid[0:64, 0:64]
    blob = np.exp(-((yy - 30) ** 2 + (xx - 34) ** 2) / (2 * 12.0 ** 2)).astype(np.float32)  # wider than the square
    refined = pamr(image, blob)
    inside = np.zeros((64, 64), bool)
    inside[20:36, 24:40] = True
    assert refined.shape == blob.shape and refined.min() >= blob.min() - 1e-6 and refined.max() <= blob.max() + 1e-6
    scaled = lambda m: (m - m.min()) / (m.max() - m.min())  # noqa: E731
    assert scaled(blob)[~inside].max() > 0.8  # the coarse map is high well outside the square
    # it flowed along the square: a step at its edge. The grey around it keeps a little (0.21 with dilations up to
    # 8 px, which the tuning scenes chose over 12, where it is 0.08): the background mixes over a shorter reach
    assert scaled(refined)[inside].min() > 0.9 and scaled(refined)[~inside].max() < 0.25
    truth = np.array([[24, 20, 16, 16]], dtype=float)
    for tau in (0.5, 0.8):
        coarse = heatmap_regions(blob, (64, 64), "single", tau)[0]
        fine = heatmap_regions(blob, (64, 64), "single", tau, refiner=Pamr(image))[0]
        assert box_iou(np.array(coarse.box), truth)[0] < 0.6 and box_iou(np.array(fine.box), truth)[0] > 0.95
    spot = np.eye(8, dtype=np.float32)
    flat = pamr(np.full((8, 8, 3), 50, np.uint8), spot[None])[0]
    assert flat.std() < spot.std() / 5 and 0 <= flat.min() <= flat.max() <= 1  # no edges: it only smooths the map
