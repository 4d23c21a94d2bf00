"""Regions refined with their picture: masks that fit the object, one region per object, one object per place,
and the formats that carry them, on pictures whose true answer is drawn."""

import json

import numpy as np
import pytest

from pipeline.labels.autolabels import ExportImage, ExportLabel
from pipeline.labels.evaluation import EvalImage, TruthObject, evaluate
from pipeline.labels.exports import labelstudio_config, write_coco, write_labelstudio
from pipeline.labels.refine import REFINERS, refiner_for
from pipeline.labels.regions import Region, group_objects, heatmap_regions, region_pixels

GREY, RED = (120, 120, 120), (220, 30, 30)


def picture(squares: list[tuple[int, int, int]], size: tuple[int, int] = (64, 64)) -> tuple[np.ndarray, list[np.ndarray]]:
    """A grey picture with red squares ``(x, y, side)``, and each square's true mask."""
    h, w = size
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GREY
    masks = []
    for x, y, side in squares:
        img[y : y + side, x : x + side] = RED
        m = np.zeros((h, w), bool)
        m[y : y + side, x : x + side] = True
        masks.append(m)
    return img, masks


def coarse_map(centres: list[tuple[float, float]], grid: int = 8, spread: float = 1.6) -> np.ndarray:
    """A grid map (``grid`` x ``grid``) with a wide blob at each centre, given as fractions of the picture: what a
    CLIP map of 8 px cells looks like, spilling over the object's border."""
    yy, xx = (np.mgrid[0:grid, 0:grid] + 0.5) / grid
    heat = sum(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (spread / grid) ** 2)) for cx, cy in centres)
    return (heat / heat.max()).astype(np.float32)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("name", list(REFINERS))
def test_a_refined_map_gives_a_mask_that_fits_the_object_better_than_the_coarse_map(name):
    img, (truth,) = picture([(20, 16, 14)])
    grid = coarse_map([(0.42, 0.38)])  # a little off the square's centre, and wider than it
    plain = heatmap_regions(grid, (64, 64), "single", 0.5)
    refined = heatmap_regions(grid, (64, 64), "single", 0.8, refiner=refiner_for(name, img))
    assert plain[0].mask is None  # CAM's rule on a coarse map: a box only
    (region,) = refined
    assert region.mask is not None and region.mask.shape == (64, 64) and region.area == region.mask.sum()
    plain_iou = mask_iou(region_pixels(plain, (64, 64)), truth)
    assert mask_iou(region.mask, truth) > max(0.6, plain_iou + 0.1), (mask_iou(region.mask, truth), plain_iou)
    x, y, w, h = region.box  # the box is the mask's
    ys, xs = np.nonzero(region.mask)
    assert (x, y, x + w, y + h) == pytest.approx((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), abs=1)


def test_refiners_are_deterministic_and_keep_a_flat_picture_flat():
    img, _ = picture([(20, 16, 14)])
    grid = coarse_map([(0.42, 0.38)])
    for name in REFINERS:
        a = heatmap_regions(grid, (64, 64), "single", 0.8, refiner=refiner_for(name, img))
        b = heatmap_regions(grid, (64, 64), "single", 0.8, refiner=refiner_for(name, img.copy()))
        assert a[0].box == b[0].box and (a[0].mask == b[0].mask).all()
        flat = np.full((64, 64, 3), 120, np.uint8)  # no edge to follow: the map stays finite, in [0, 1]
        out = refiner_for(name, flat)(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))
        assert np.isfinite(out).all() and out.min() >= -1e-6 and out.max() <= 1 + 1e-6
    assert refiner_for("none", img) is None


def test_two_objects_of_one_colour_give_two_regions_each_fitting_one():
    img, truths = picture([(6, 8, 12), (42, 38, 14)])
    grid = coarse_map([(0.19, 0.22), (0.75, 0.70)])  # "red": one map over both red squares
    regions = heatmap_regions(grid, (64, 64), "single", 0.7, multi_instance=True, min_area=0.002,
                              refiner=refiner_for("pamr", img))
    assert len(regions) == 2
    for truth in truths:
        assert max(mask_iou(r.mask, truth) for r in regions) > 0.6
    assert {tuple(r.box) for r in regions}.__len__() == 2 and all(0 < r.peak <= 1 for r in regions)


def test_two_labels_on_one_object_share_its_number_and_label_studio_shows_one_region_with_both(tmp_path):
    from label_studio_sdk.label_interface import LabelInterface
    from pycocotools.coco import COCO

    img, _ = picture([(6, 8, 12), (42, 38, 14)])
    pamr = refiner_for("pamr", img)
    on_first = coarse_map([(0.19, 0.22)])
    red = heatmap_regions(on_first, (64, 64), "single", 0.7, refiner=pamr)
    square = heatmap_regions(on_first * 0.9, (64, 64), "single", 0.7, refiner=pamr)
    other = heatmap_regions(coarse_map([(0.75, 0.70)]), (64, 64), "single", 0.7, refiner=pamr)
    numbered = group_objects([red, square, other])
    assert numbered[0][0].object == numbered[1][0].object == 1 and numbered[2][0].object == 2
    labels = [ExportLabel(n, s, (n,), tuple(rs)) for n, s, rs in zip(("red", "square", "ring"), (0.3, 0.28, 0.25), numbered)]
    im = ExportImage("a-1", "a.png", "/x/a.png", 64, 64, labels)

    write_labelstudio(tmp_path / "ls", [im], "v", "")
    (task,) = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    result = task["predictions"][0]["result"]
    boxes = [r["value"]["rectanglelabels"] for r in result if r["type"] == "rectanglelabels"]
    assert boxes == [["red", "square"], ["ring"]]
    li = LabelInterface(labelstudio_config(["red", "ring", "square"]))
    assert li.validate_prediction(task["predictions"][0], return_errors=True) == []

    write_coco(tmp_path / "coco", [im], "test")
    doc = json.loads((tmp_path / "coco" / "instances.json").read_text())
    assert [a["object_id"] for a in doc["annotations"]] == [1, 1, 2]
    coco = COCO(str(tmp_path / "coco" / "instances.json"))
    for ann in coco.loadAnns(coco.getAnnIds()):  # every refined mask decodes to its image's size
        assert coco.annToMask(ann).shape == (64, 64) and coco.annToMask(ann).sum() == ann["area"]


def test_refined_masks_of_a_wide_picture_decode_to_its_size_in_coco_and_label_studio(tmp_path):
    from label_studio_sdk.converter.brush import decode_rle
    from label_studio_sdk.label_interface import LabelInterface
    from pycocotools.coco import COCO

    img, _ = picture([(66, 13, 21)], size=(64, 128))  # the picture at the maps' working size for 480 x 960
    grid = coarse_map([(0.6, 0.38)])
    regions = heatmap_regions(grid, (480, 960), "single", 0.8, refiner=refiner_for("guided", img))
    (region,) = regions  # found at the working size (64 x 128), its mask at the image's 480 x 960
    assert region.mask.shape == (480, 960)
    im = ExportImage("w-1", "w.jpg", "/x/w.jpg", 960, 480, [ExportLabel("red", 0.3, ("red",), (region,))])
    write_coco(tmp_path / "coco", [im], "test")
    coco = COCO(str(tmp_path / "coco" / "instances.json"))
    (ann,) = coco.loadAnns(coco.getAnnIds())
    assert (coco.annToMask(ann).astype(bool) == region.mask).all()
    write_labelstudio(tmp_path / "ls", [im], "v", "")
    (task,) = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    brush = next(r for r in task["predictions"][0]["result"] if r["type"] == "brushlabels")
    assert ((np.reshape(decode_rle(brush["value"]["rle"]), (480, 960, 4))[..., 3] > 0) == region.mask).all()
    assert LabelInterface(labelstudio_config(["red"])).validate_prediction(task["predictions"][0], return_errors=True) == []


def test_eval_measures_mask_miou_and_each_refiner_with_its_best_tau():
    img, (truth,) = picture([(20, 16, 14)])
    ys, xs = np.nonzero(truth)
    obj = TruthObject((float(xs.min()), float(ys.min()), 14.0, 14.0), truth)
    grid = coarse_map([(0.42, 0.38)])
    perfect = EvalImage(truth={"red": [obj]}, scores={"red": 0.3}, exported=["red"], boxes={"red": [obj.box]},
                        maps={"single": {"red": grid}}, size=(64, 64), masks={"red": truth}, picture=img)
    result = evaluate([perfect], ["single"], ("none", "pamr"))
    assert result["overall"]["miou"] == 1.0 and result["overall"]["corloc"] == 1.0
    blocks = result["overall"]["methods"]["single"]["refiners"]
    assert set(blocks) == {"none", "pamr"}
    for block in blocks.values():
        assert str(block["best_corloc_tau"]) in block["by_tau"]
        assert block["miou_at_best_corloc_tau"] == block["by_tau"][str(block["best_corloc_tau"])]["miou"]
    assert blocks["pamr"]["miou_at_best_corloc_tau"] > blocks["none"]["miou_at_best_corloc_tau"] + 0.1
    empty = EvalImage(truth={"red": [obj]}, scores={"red": 0.3}, exported=["red"], boxes={"red": []}, size=(64, 64))
    assert evaluate([empty], ["single"])["overall"]["miou"] == 0.0  # no region: nothing of the object covered
    assert "refiners" not in evaluate([empty], ["single"], ("pamr",))["overall"]["methods"]["single"]


def pamr_by_gathering(image: np.ndarray, maps: np.ndarray, iterations: int, dilations: tuple[int, ...]) -> np.ndarray:
    """PAMR as its equations read: each pixel's neighbours gathered by index (the edges replicated), their
    affinities a softmax of the colour differences over the local spread, the maps propagated by them."""
    x = image.astype(np.float32) / 255.0
    h, w = x.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    index = np.stack([np.clip(ys + dy * d, 0, h - 1) * w + np.clip(xs + dx * d, 0, w - 1) for d in dilations
                      for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]).reshape(-1, h * w)
    flat = x.reshape(h * w, 3).T
    near = flat[:, index]
    spread = np.concatenate([near, flat[:, None]], 1).std(1, ddof=1, keepdims=True)
    k = (-np.abs(near - flat[:, None]) / (1e-8 + 0.1 * spread)).mean(0)
    a = np.exp(k - k.max(0, keepdims=True))
    a /= a.sum(0, keepdims=True)
    m = maps.reshape(-1, h * w).astype(np.float32)
    for _ in range(iterations):
        m = np.einsum("knp,np->kp", m[:, index], a)
    return m.reshape(maps.shape)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (11, 13)])  # smaller than the largest dilation, too
def test_pamr_by_shifted_slices_is_pamr_by_gathered_neighbours(size):
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    maps = rng.random((3, *size)).astype(np.float32)
    got = REFINERS["pamr"](img)(maps)
    want = pamr_by_gathering(img, maps, 20, (1, 2, 4, 8))
    assert got.shape == maps.shape and np.abs(got - want).max() < 1e-5

