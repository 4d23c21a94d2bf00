"""Discovery past the dominant concept: tile views, explaining words away, and decode's merge with evidence."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.model.encode import encode_images, explain_away, view_features, word_directions
from pipeline.model.discovery import BOXED, WHOLE, border_fill, object_boxes, tile_boxes, tile_views
from pipeline.run.images import to_tensor
from pipeline.toy.world import SceneSpec, make_scene, scene_rng
from pipeline.model.discovery import Opinion, merge_views
from stages.ascend import AscentConfig, discover_opinions, extract_opinions, region_boxes
from stages.decode import DecodeConfig, decode_labels, label_opinions

QUICK = AscentConfig(iterations=12, candidates=4, bank_size=16, views=8, checkin_every=5, tile_bank=8)


def _scenes(n, objects, seed=3):
    spec = SceneSpec(min_objects=objects, max_objects=objects)
    return [make_scene(scene_rng(seed, i), spec) for i in range(n)]


def _tensors(scenes, res=64):
    return torch.stack([to_tensor(Image.fromarray(s.image), res) for s in scenes])


def test_tiles_cover_the_image_edge_to_edge_and_keep_objects_in_place():
    boxes = tile_boxes(2, 0.625)
    assert boxes == [(0.0, 0.0, 0.625, 0.625), (0.375, 0.0, 0.625, 0.625), (0.0, 0.375, 0.625, 0.625),
                     (0.375, 0.375, 0.625, 0.625)]
    assert tile_boxes(1, 0.5) == [(0.0, 0.0, 0.5, 0.5)] and tile_boxes(0, 0.5) == []
    images = torch.rand(2, 3, 64, 64)
    views = tile_views(images, boxes)
    assert views.shape == (8, 3, 64, 64)
    fill = border_fill(images)
    for b in range(2):
        for k, (x, y, w, h) in enumerate(boxes):
            v = views[b * 4 + k]
            x0, y0, x1, y1 = round(x * 64), round(y * 64), round((x + w) * 64), round((y + h) * 64)
            assert torch.equal(v[:, y0:y1, x0:x1], images[b, :, y0:y1, x0:x1])  # same pixels, same place, same size
            outside = torch.ones(64, 64, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            assert torch.equal(v[:, outside], fill[b, :, 0].expand(-1, int(outside.sum())))
    assert torch.equal(tile_views(images, [WHOLE]), images)


def test_explaining_away_removes_exactly_the_words_directions(toy):
    basis = word_directions(toy, [["red", "circle"], ["blue"], []], 128)
    assert basis.shape == (3, 2, 128)
    gram = basis[0] @ basis[0].T
    assert torch.allclose(gram, torch.eye(2), atol=1e-5)  # orthonormal
    assert torch.count_nonzero(basis[1, 1]) == 0 and torch.count_nonzero(basis[2]) == 0  # zero rows do nothing
    target = F.normalize(torch.randn(3, 128), dim=-1)
    out = explain_away(target, basis)
    assert torch.allclose(torch.einsum("bd,bed->be", out, basis), torch.zeros(3, 2), atol=1e-5)
    assert torch.allclose(out[2], target[2])
    assert explain_away(target, None) is target


def test_merge_views_adds_statistics_and_names_each_candidate_view():
    a = Opinion([{"text": "red"}], {"red": {"frequency": 2, "candidates": 1, "appearances": 5, "first_iteration": 5}},
                [{"iteration": 0, "counts": {"red": 1}}])
    b = Opinion([{"text": "ring"}, {"text": "red"}],
                {"red": {"frequency": 1, "candidates": 1, "appearances": 2, "first_iteration": 0},
                 "ring": {"frequency": 3, "candidates": 2, "appearances": 4, "first_iteration": 0}},
                [{"iteration": 0, "counts": {"ring": 2, "red": 1}}])
    m = merge_views([(a, {"kind": "image", "box": list(WHOLE)}), (b, {"kind": "tile", "box": [0, 0, 0.5, 0.5]})])
    assert [c["view"] for c in m.candidates] == [0, 1, 1]
    assert m.words["red"] == {"frequency": 3, "candidates": 2, "appearances": 7, "first_iteration": 0}
    assert list(m.words) == ["red", "ring"] and m.checkins == [{"iteration": 0, "counts": {"red": 2, "ring": 2}}]
    assert [(v["view"], v["kind"], v["candidates"], v["checkins"]) for v in m.views] == [(0, "image", 1, 1), (1, "tile", 2, 1)]


def test_object_boxes_find_each_group_of_unusual_patches_largest_first():
    gen = torch.Generator().manual_seed(0)
    background, a, b = torch.randn(3, 16, generator=gen)
    grid = background.repeat(8, 8, 1) + 0.05 * torch.randn(8, 8, 16, generator=gen)  # [gh, gw, D]
    grid[1:3, 1:4] = a  # 2 x 3 patches
    grid[5:8, 5:8] = b + 0.05 * torch.randn(3, 3, 16, generator=gen)  # 3 x 3, at the corner
    patches = grid.view(64, 16)
    assert object_boxes(patches, (8, 8), limit=4) == [(0.5, 0.5, 0.5, 0.5), (0.0, 0.0, 0.625, 0.5)]  # one patch grown
    assert object_boxes(patches, (8, 8), limit=1) == [(0.5, 0.5, 0.5, 0.5)]
    assert object_boxes(patches, (8, 8), limit=4, margin=0) == [(0.625, 0.625, 0.375, 0.375), (0.125, 0.125, 0.375, 0.25)]
    assert object_boxes(background.repeat(64, 1), (8, 8), limit=4) == []  # a uniform image has no objects


@pytest.mark.parametrize("objects", [1, 2, 3])
def test_regions_cover_every_object_of_toy_scenes_one_region_each(toy, objects):
    """The toy's CLIP Surgery patch tokens, with no word: each object lies inside one of the image's regions,
    and there are about as many regions as objects (fewer where two objects touch)."""
    scenes = _scenes(12, objects, seed=5)
    boxes = region_boxes(toy, _tensors(scenes), limit=4)
    for scene, bs in zip(scenes, boxes):
        for obj in scene.objects:
            assert max((_overlap(b, obj.mask) for b in bs), default=0) >= 0.9, (objects, bs)
    assert abs(sum(map(len, boxes)) / len(boxes) - objects) <= 0.25, [len(b) for b in boxes]


@pytest.mark.parametrize("discover", ["regions", "tiles", "explain"])
def test_discovery_is_seeded_and_never_depends_on_the_batch(toy, discover):
    imgs = _tensors(_scenes(3, 3))
    cfg = replace(QUICK, discover=discover)
    together = discover_opinions(toy, imgs, [1, 2, 3], cfg)
    again = discover_opinions(toy, imgs, [1, 2, 3], cfg)
    alone = discover_opinions(toy, imgs[1:2], [2], cfg)[0]
    assert [op.candidates for op in together] == [op.candidates for op in again]
    assert alone.candidates == together[1].candidates and alone.words == together[1].words and alone.views == together[1].views
    assert together[0].views[0]["kind"] == "image"
    if discover == "tiles":
        assert [v["kind"] for v in together[0].views] == ["image"] + ["tile"] * 4
        assert len(together[0].candidates) == QUICK.candidates + 4 * QUICK.tile_candidates
    if discover == "regions":  # three objects a scene: a region each, or fewer where two touch
        for op in together:
            kinds = [v["kind"] for v in op.views]
            assert kinds[0] == "image" and 1 <= len(kinds) - 1 <= QUICK.regions and set(kinds[1:]) == {"region"}
            assert len(op.candidates) == QUICK.candidates + (len(kinds) - 1) * QUICK.tile_candidates


def test_whole_is_the_single_ascent(toy):
    imgs = _tensors(_scenes(2, 2))
    one = discover_opinions(toy, imgs, [4, 5], replace(QUICK, discover="whole"))
    plain = extract_opinions(toy, imgs, [4, 5], QUICK)
    assert [(o.candidates, o.words, o.views) for o in one] == [(o.candidates, o.words, []) for o in plain]


def test_decode_scores_each_word_where_it_was_found_and_keeps_the_evidence():
    def view(k, kind, box, words, checkins=4):
        return {"view": k, "kind": kind, "box": box, "candidates": 4, "checkins": checkins,
                "words": {w: {"frequency": f, "appearances": a} for w, (f, a) in words.items()}}

    views = [view(0, "image", [0, 0, 1, 1], {"red": (4, 16)}),
             view(1, "tile", [0, 0, 0.5, 0.5], {"red": (2, 8), "ring": (3, 12)}),
             view(2, "tile", [0.5, 0.5, 0.5, 0.5], {"odd": (1, 1)})]
    words = {"red": {"frequency": 6, "appearances": 24}, "ring": {"frequency": 3, "appearances": 12},
             "odd": {"frequency": 1, "appearances": 1}}
    op = {"words": words, "candidates": [], "checkins": [{}] * 4, "views": views, "settings": {}}
    axes = {"red": [1.0, 0.0], "ring": [0.0, 1.0]}
    text = lambda ws: F.normalize(torch.tensor([axes[w] for w in ws]), dim=-1)  # noqa: E731
    feats = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)  # the image sees red, a tile sees ring
    out = label_opinions([op], [feats], text, DecodeConfig())[0].labels
    assert [d["word"] for d in out] == ["red", "ring"]  # "odd": 1 / 16 of its view's candidates; each word once
    red, ring = out
    assert [e["view"] for e in red["evidence"]] == [0, 1] and red["score"] == 1.0  # most appearances first
    assert [e["view"] for e in ring["evidence"]] == [1] and ring["evidence"][0]["box"] == [0, 0, 0.5, 0.5]
    assert ring["score"] == 0.8  # on its tile: on the whole image it scores 0 and would be dropped


def test_view_features_are_the_views_ascend_saw(toy):
    imgs = _tensors(_scenes(1, 2))
    views = [[{"kind": "image", "box": [0, 0, 1, 1]}, {"kind": "tile", "box": [0.5, 0, 0.5, 0.5]},
              {"kind": "round", "box": [0, 0, 1, 1], "explained": ["red"]}]]
    with torch.no_grad():
        f = view_features(toy, imgs, views)[0]
        whole = encode_images(toy, imgs)
        tile = view_features(toy, tile_views(imgs, [(0.5, 0, 0.5, 0.5)]), [[]])[0]
        red = word_directions(toy, [["red"]], f.shape[1])[0, 0]
    assert f.shape == (3, 128)
    assert torch.allclose(f[0], whole[0], atol=1e-4) and torch.allclose(f[1], tile[0], atol=1e-5)
    assert abs(float(f[2] @ red)) < 1e-5 and torch.allclose(f[2].norm(), torch.tensor(1.0))


def _overlap(box, mask):
    """The share of the object's pixels inside a fractional box."""
    h, w = mask.shape
    x, y, bw, bh = box
    inside = np.zeros_like(mask)
    inside[round(y * h): round((y + bh) * h), round(x * w): round((x + bw) * w)] = True
    return (mask & inside).sum() / mask.sum()


@pytest.mark.parametrize("discover", ["regions", "tiles"])
def test_views_find_every_object_of_toy_scenes_and_their_evidence_overlaps_them(toy, discover):
    """On training-style toy scenes of three objects, at the fast preset's ascent: most true words are labels,
    more than the whole-image ascent alone gives (the opinion's first view, with the same seed), and the
    regions (tiles) among each true word's evidence hold part of an object it names, nearly always most of it."""
    scenes = _scenes(4, 3, seed=21)
    imgs = _tensors(scenes)
    cfg = AscentConfig(iterations=100, candidates=8, checkin_every=5, discover=discover)  # the fast preset
    ops = discover_opinions(toy, imgs, [7, 8, 9, 10], cfg)
    docs = [{"words": o.words, "candidates": o.candidates, "checkins": o.checkins, "views": o.views, "settings": {}}
            for o in ops]
    from pipeline.model.prompts import prompt_ensemble

    with torch.no_grad():
        labels = label_opinions(docs, view_features(toy, imgs, [o.views for o in ops]),
                                lambda ws: prompt_ensemble(toy.model, ws), DecodeConfig())
    found = total = alone = 0
    held: list[float] = []  # per true word with boxed evidence: the most of an object it names in one of its boxes
    for scene, lab, op in zip(scenes, labels, ops):
        by_word = {d["word"]: d for d in lab.labels}
        whole = {d["word"] for d in decode_labels(op.views[0]["words"], DecodeConfig())}
        for obj in scene.objects:
            for word in obj.words:
                total += 1
                alone += word in whole
                if word not in by_word:
                    continue
                found += 1
                boxed = [e for e in by_word[word]["evidence"] if e["kind"] in BOXED]
                owners = [o for o in scene.objects if word in o.words]
                if boxed:  # the views that produced the word hold part of an object it names
                    held.append(max(_overlap(e["box"], o.mask) for e in boxed for o in owners))
                    assert held[-1] >= 0.1, (word, boxed)
    assert found / total >= 0.7 and found > alone, f"found {found} of {total} true words, the whole image alone {alone}"
    # and nearly always most of it (a region's box, grown by a patch, can hold the edge of a neighbour it names)
    assert len(held) >= 8 and sum(h > 0.5 for h in held) / len(held) >= 0.9, held
