import cv2
import numpy as np
import pytest
import torch

from pipeline.toy.world import COLOURS, SHAPES, SceneSpec, make_scenes, write_scenes
from pipeline.toy.train import held_out_single_objects, zero_shot_accuracy


def test_generator_is_deterministic_and_prefix_stable():
    a, b = make_scenes(3, 5), make_scenes(3, 8)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and x.caption == y.caption
    assert not np.array_equal(make_scenes(4, 1)[0].image, a[0].image)


def test_vocabulary_and_variety():
    scenes = make_scenes(0, 300)
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES) and {o.colour for o in objs} == set(COLOURS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}
    assert {s.background for s in scenes} == {"flat", "noise", "gradient", "stripes"}
    sizes = np.array([o.size for o in objs]) / 64
    assert sizes.min() >= 0.15 and sizes.max() <= 0.40 and sizes.max() - sizes.min() > 0.2
    centers = np.array([o.center for o in objs])
    assert centers.std(0).min() > 8  # anywhere in the frame, not a grid


@pytest.mark.parametrize("style, spill", [("train", 0.35), ("alt", 0.35), ("varied", 1.0), ("mixed", 1.0), ("blend", 1.0)])  # varied blurs up to 1.2 px
def test_masks_match_drawn_pixels(style, spill):
    near_all = []
    for scene in make_scenes(1, 40, SceneSpec(style=style)):
        for obj in scene.objects:
            assert obj.mask.sum() > 10
            ref = np.median(scene.image[obj.mask].astype(float), 0)
            core = cv2.erode(obj.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # edges may blend
            near_all.extend(np.abs(scene.image[core].astype(float) - ref).max(1) < 60)
            cov = (np.abs(scene.image.astype(float) - ref).max(2) < 25)
            outside = cov & ~np.any([o.mask for o in scene.objects], 0)
            assert outside.sum() < spill * obj.mask.sum() + 6, scene.caption  # little of that colour lies outside
    assert np.mean(near_all) > 0.95  # inside the masks is the objects' colour


def test_write_scenes_truth_matches_the_pixels(tmp_path):
    import json

    from PIL import Image

    from pipeline.toy.world import COLOURS, make_scenes

    truth = write_scenes(tmp_path, 0, 3)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["scene_0000.png", "scene_0001.png", "scene_0002.png"]
    doc = json.loads(truth.read_text())
    assert doc["seed"] == 0 and doc["size"] == 64 and len(doc["scenes"]) == 3
    for entry, scene in zip(doc["scenes"], make_scenes(0, 3)):
        assert entry["caption"] == scene.caption and len(entry["objects"]) == len(scene.objects)
        pixels = np.asarray(Image.open(tmp_path / entry["file"]))
        assert np.array_equal(pixels, scene.image)  # the PNG is the scene, losslessly
        for obj, truth_obj in zip(scene.objects, entry["objects"]):
            x0, y0, x1, y1 = truth_obj["bbox"]
            ys, xs = np.nonzero(obj.mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert truth_obj["colour"] == obj.colour and truth_obj["shape"] == obj.shape
            inside = pixels[y0:y1, x0:x1][obj.mask[y0:y1, x0:x1]].astype(float).mean(0)
            assert np.abs(inside - COLOURS[obj.colour]).max() < 80  # the box holds the object's colour


def test_shipped_toy_model_zero_shot_accuracy(toy):
    with torch.no_grad():
        acc = zero_shot_accuracy(toy.model, held_out_single_objects(200), torch.device("cpu"))
    assert acc["joint36"] >= 0.93, acc  # the card's figures are checked in test_models


def test_heldout_renderer_is_its_own_and_its_masks_match():
    """The benchmarks' held-out renderer: deterministic per seed and index, never the package's pixels, masks on
    the drawn colour."""
    from tests.benchmarks.heldout import heldout_scenes

    a, b = heldout_scenes(30), heldout_scenes(30)
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    assert not np.array_equal(heldout_scenes(1, seed=8)[0].image, a[0].image)
    shapes = {o.shape for s in a for o in s.objects}
    assert len(shapes) == 6 and all(len(s.objects) == 1 for s in a)
    for scene in a:
        obj = scene.objects[0]
        assert obj.mask.sum() > 5
        inside = np.median(scene.image[obj.mask].astype(float), 0)
        outside = np.median(scene.image[~obj.mask].astype(float), 0)
        assert np.abs(inside - outside).max() > 20, scene.caption  # the object stands out from its background


RENDERERS = ("_render_train", "_render_varied", "_render_alt")


def _renderers_used(style: str, count: int, monkeypatch) -> list[str]:
    """The renderer of each of ``count`` scenes of ``style``, after checking that drawing them again gives the
    same pictures (a scene is a pure function of its seed)."""
    import pipeline.toy.world as tw

    first = [s.image for s in make_scenes(2, count, SceneSpec(style=style))]
    used: list[str] = []
    for name in RENDERERS:
        real = getattr(tw, name)
        monkeypatch.setattr(tw, name, lambda *a, _real=real, _name=name: used.append(_name) or _real(*a))
    again = [s.image for s in make_scenes(2, count, SceneSpec(style=style))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert len(used) == count
    return used


def test_mixed_scenes_are_drawn_by_both_training_renderers(monkeypatch):
    """``mixed`` draws each scene with ``train``'s renderer or ``varied``'s, about half each."""
    used = _renderers_used("mixed", 60, monkeypatch)
    assert "_render_alt" not in used
    assert 18 <= used.count("_render_train") <= 42, used.count("_render_train")


def test_blend_scenes_are_drawn_by_all_three_renderers(monkeypatch):
    """``blend`` draws each scene with ``train``'s, ``varied``'s or ``alt``'s renderer, about a third each."""
    used = _renderers_used("blend", 90, monkeypatch)
    counts = [used.count(n) for n in RENDERERS]
    assert all(15 <= c <= 45 for c in counts), counts
