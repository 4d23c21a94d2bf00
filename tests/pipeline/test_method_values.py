"""Every heatmap method's maps against values saved before the methods became classes (to 1e-6).

The saved file holds the maps ``compute_heatmaps`` gave at commit 62d3c67, on the shipped toy, a tiny random
ViT, a tiny random ResNet and a random OpenCLIP ViT, for every method and the settings that change how
a method runs (depth, feature surgery, windows, the ResNet variant). ``python -m tests.pipeline.test_method_values``
writes the file again; do that only for a change that is meant to change the maps, and say so in its commit.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.model.load import load_model
from pipeline.heatmaps.compute import compute_heatmaps
from stages.surgery import SurgeryConfig

SAVED = Path(__file__).parent / "data" / "method_maps.npz"
VIT = ("raw", "surgery", "single", "maskclip", "sclip", "clearclip", "naclip", "resclip", "gem")
RESNET = ("raw", "surgery", "single", "maskclip")
WORDS = [["a", "b", "c"], ["b"]]  # three labels (feature surgery over them) and one (the single-text form)

# case -> (model, image side, single side, settings)
CASES: dict[str, tuple[str, int, int, dict]] = {
    "toy": ("toy", 64, 96, {"surgery_depth": 3}),
    "toy-deep": ("toy", 64, 64, {"surgery_depth": 9, "naclip_sigma": 2.0}),
    "toy-fs-off": ("toy", 64, 64, {"surgery_depth": 2, "feature_surgery": "off"}),
    "toy-fs-single": ("toy", 64, 64, {"surgery_depth": 3, "feature_surgery": "single"}),
    "toy-windows": ("toy", 96, 64, {"surgery_depth": 3, "window_side": 96}),
    "tiny": ("random:tiny", 48, 40, {"surgery_depth": 1}),
    "tiny-rn": ("random:tiny-rn", 128, 96, {"methods": RESNET}),
    "tiny-rn-normalised": ("random:tiny-rn", 96, 128, {"methods": RESNET, "resnet_surgery": "normalised"}),
    "openclip-vit": ("random:openclip:ViT-S-32", 64, 96, {"surgery_depth": 2}),
}


def _inputs(side: int, single: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, side, side, generator=g)
    singles = torch.randn(2, 3, single, single, generator=g)
    text = F.normalize(torch.randn(3, dim, generator=g), dim=-1)
    empty = F.normalize(torch.randn(dim, generator=g), dim=-1)
    return images, singles, text, empty


def case_maps(case: str, models: dict) -> dict[str, np.ndarray]:
    name, side, single, settings = CASES[case]
    if name not in models:
        models[name] = load_model(name, torch.device("cpu"), seed=0)
    lm = models[name]
    cfg = replace(SurgeryConfig(methods=VIT), **settings)
    images, singles, text, empty = _inputs(side, single, lm.clip.text_projection.shape[1])
    with torch.inference_mode():
        results = compute_heatmaps(lm.clip, images, singles, WORDS, ["a", "b", "c"], text, empty, [(40, 50), (50, 40)], cfg)
    out = {}
    for i, hm in enumerate(results):
        for m, maps in hm.maps.items():
            out[f"{case}/{i}/{m}"] = maps.astype(np.float32)
            out[f"{case}/{i}/{m}/range"] = np.asarray(hm.ranges[m], np.float64)  # [T, 2]: the similarity 0 and 1 stand for
        out[f"{case}/{i}/points"] = np.asarray([p for pts, _ in hm.points for p in pts] or [[-1, -1]], np.int32)
    return out


@pytest.fixture(scope="module")
def saved():
    return dict(np.load(SAVED))


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.mark.parametrize("case", list(CASES))
def test_maps_equal_the_saved_values(case, saved, models):
    got = case_maps(case, models)
    expected = {k: v for k, v in saved.items() if k.startswith(f"{case}/")}
    assert sorted(got) == sorted(expected)  # the same methods, images and point sets
    for key, value in expected.items():
        assert got[key].shape == value.shape, key
        if key.endswith("/points"):
            assert (got[key] == value).all(), key
        elif key.endswith("/range"):
            assert float(np.abs(got[key] - value).max()) <= 1.5e-5, key  # saved rounded to 5 places: one step either way
        else:  # in the similarity's own units: a map is min-max scaled, which magnifies rounding on a flat map
            span = (expected[f"{key}/range"][:, 1] - expected[f"{key}/range"][:, 0]).reshape(-1, 1, 1)
            assert float((np.abs(got[key] - value) * span).max()) <= 1e-6, key


if __name__ == "__main__":
    SAVED.parent.mkdir(parents=True, exist_ok=True)
    cache: dict = {}
    arrays = {k: v for case in CASES for k, v in case_maps(case, cache).items()}
    np.savez_compressed(SAVED, **arrays)
    print(f"wrote {len(arrays)} arrays to {SAVED}", file=sys.stderr)
