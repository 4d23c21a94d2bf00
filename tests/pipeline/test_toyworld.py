import cv2
import numpy as np
import pytest
import torch

from pipeline.toyworld import COLOURS, SHAPES, SceneSpec, make_scenes, write_scenes
from pipeline.toytrain import held_out_single_objects, zero_shot_accuracy


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


@pytest.mark.parametrize("style", ["train", "alt"])
def test_masks_match_drawn_pixels(style):
    near_all = []
    for scene in make_scenes(1, 40, SceneSpec(style=style)):
        for obj in scene.objects:
            assert obj.mask.sum() > 10
            ref = np.median(scene.image[obj.mask].astype(float), 0)
            core = cv2.erode(obj.mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)  # edges may blend
            near_all.extend(np.abs(scene.image[core].astype(float) - ref).max(1) < 60)
            cov = (np.abs(scene.image.astype(float) - ref).max(2) < 25)
            outside = cov & ~np.any([o.mask for o in scene.objects], 0)
            assert outside.sum() < 0.35 * obj.mask.sum() + 6, scene.caption  # little of that colour lies outside
    assert np.mean(near_all) > 0.95  # inside the masks is the objects' colour


def test_write_scenes(tmp_path):
    truth = write_scenes(tmp_path, 0, 3)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["scene_0000.png", "scene_0001.png", "scene_0002.png"]
    assert truth.is_file() and "objects" in truth.read_text()


def test_shipped_toy_model_zero_shot_accuracy(toy):
    acc = zero_shot_accuracy(toy.model, held_out_single_objects(200), torch.device("cpu"))
    assert acc["joint36"] >= 0.95, acc
