"""Optional SAM masks: clear errors before any work, and the plumbing through a real (randomly initialised) SAM."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pipeline.run.config import ConfigError
from pipeline.toy.world import write_scenes
from runall import app
from pipeline.sam import SamConfig, load_sam
from tests.conftest import fast_args

FAST = fast_args()


def test_missing_checkpoint_and_missing_extra_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"no file at .*nope\.pth.*segment-anything#model-checkpoints"):
        load_sam(SamConfig(checkpoint=str(tmp_path / "nope.pth")), torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install -e '\.\[sam\]'"):
        load_sam(SamConfig(checkpoint=str(tmp_path / "nope.pth")), torch.device("cpu"))


def test_cli_fails_before_any_work_without_the_checkpoint(tmp_path):
    write_scenes(tmp_path / "imgs", 0, 2)
    r = CliRunner().invoke(app, ["--input", str(tmp_path / "imgs"), "--model", "random:tiny", "--output", str(tmp_path / "out"),
                                 "--run-name", "r", "--quiet", "--set", f"surgery.sam.checkpoint={tmp_path / 'sam.pth'}"])
    assert r.exit_code == 2 and "sam.pth" in r.output
    assert not (tmp_path / "out" / "r" / "ascend").exists()


def test_masks_from_a_real_randomly_initialised_sam(tmp_path):
    from segment_anything import sam_model_registry

    ckpt = tmp_path / "sam_vit_b.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), ckpt)
    write_scenes(tmp_path / "imgs", 0, 1)
    r = CliRunner().invoke(app, ["--input", str(tmp_path / "imgs"), "--model", "toy", "--output", str(tmp_path / "out"),
                                 "--run-name", "r", "--quiet", *FAST, "--set", "surgery.max_labels=2",
                                 "--set", f"surgery.sam.checkpoint={ckpt}", "--set", "surgery.sam.model_type=vit_b"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "r"
    (meta_path,) = (run / "surgery").glob("*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["labels"]
    for d in meta["labels"]:
        assert d["points"], d  # a toy map is never flat
        mask = np.asarray(Image.open(run / d["mask"]))
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        assert d["mask"].endswith(f"__{d['slug']}__sam.png")
