"""Shared fixtures: tiny random models and the shipped toy model, on the CPU, never the network; fast settings."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import load_model
from pipeline.toyworld import TRUTH_COCO, write_scenes

# The one set of fast run settings the CLI-level tests share: a few ascent steps, every word a label,
# small single-text maps. A test that needs more passes its own keys, which win.
FAST = {"ascend.iterations": 6, "ascend.candidates": 4, "ascend.bank_size": 8, "ascend.views": 4,
        "decode.min_frequency": 1, "surgery.single_resolution": 64}


def fast_args(**overrides) -> list[str]:
    """``--set KEY=VALUE`` arguments for ``FAST`` with ``overrides`` (``ascend__iterations=20`` is ``ascend.iterations``)."""
    merged = {**FAST, **{k.replace("__", "."): v for k, v in overrides.items()}}
    return [arg for key, value in merged.items() for arg in ("--set", f"{key}={value}")]


@pytest.fixture(scope="session")
def toy():
    return load_model("toy", torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny():
    return load_model("random:tiny", torch.device("cpu"), seed=0)


@pytest.fixture
def images(tmp_path):
    """A folder of three toy scenes (no truth file), as a user's input."""
    d = tmp_path / "imgs"
    write_scenes(d, 0, 3)
    (d / "truth.json").unlink()
    (d / TRUTH_COCO).unlink()
    return d
