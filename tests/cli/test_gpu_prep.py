"""The GPU session's toy training, run the way a lent GPU runs it, at a tiny scale on the CPU: every file it
promises, and its figures, from one unattended call."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_toytrain_leaves_both_phases_checkpoints_and_their_curves(tmp_path):
    out = tmp_path / "toy"
    proc = subprocess.run([sys.executable, "tests/benchmarks/gpu_toytrain.py", "--out", str(out), "--steps", "2",
                           "--surgery-steps", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "toytrain.json").read_text())
    assert list(report["phases"]) == ["scratch-gpu", "scratch-surgery-gpu"] and report["device"] == "cpu"
    for phase in report["phases"].values():
        assert phase["steps"] == 2 and phase["stopped_at"] is None and phase["history"][-1]["step"] == 2
    final = torch.load(out / "toy-clip-scratch.pt", map_location="cpu")
    first = torch.load(out / "scratch.pt", map_location="cpu")
    assert set(final) == set(first) and not torch.equal(final["visual.proj"], first["visual.proj"])  # phase 2 trained
    card = json.loads((out / "toy-clip-scratch.json").read_text())
    assert card["recipe"]["name"] == "scratch-surgery-gpu" and card["recipe"]["surgery_weight"] > 0
    assert card["recipe"]["start_from"]["file"] == "scratch.pt" and str(tmp_path) not in json.dumps(card)
