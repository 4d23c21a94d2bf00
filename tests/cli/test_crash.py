"""Crash safety: a run killed with SIGKILL mid-way finishes when the same command runs again, skipping finished work."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.toy.world import write_scenes
from tests.conftest import fast_args

ROOT = Path(__file__).resolve().parents[2]  # the repository


def _records(run):
    path = run / "manifest.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line is what a kill can leave
            pass
    return out


def test_killed_run_resumes_and_finishes(tmp_path):
    write_scenes(tmp_path / "imgs", 0, 4)
    (tmp_path / "imgs" / "truth.json").unlink()
    cmd = [sys.executable, str(ROOT / "runall.py"), "--input", str(tmp_path / "imgs"), "--model", "random:tiny",
           "--output", str(tmp_path / "out"), "--run-name", "r", "--quiet",
           *fast_args(ascend__iterations=80, ascend__candidates=16, ascend__bank_size=256, ascend__views=64,
                      ascend__batch_size=1)]  # slow enough per image to be killed between images
    run = tmp_path / "out" / "r"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and sum(r["stage"] == "ascend" for r in _records(run)) < 1:
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    before = {r["image"] for r in _records(run) if r["stage"] == "ascend" and r["status"] == "done"}
    assert 1 <= len(before) < 4

    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    recs = _records(run)
    ids = [json.loads(x)["id"] for x in (run / "images.jsonl").read_text().splitlines()]
    for stage in ("ascend", "decode", "surgery"):
        finished = {r["image"] for r in recs if r["stage"] == stage and r["status"] == "done"}
        assert finished == set(ids), stage
    for image in before:  # finished work was skipped, not redone
        assert sum(r["image"] == image and r["stage"] == "ascend" for r in recs) == 1
    for path in run.rglob("*.json"):
        if not path.name.startswith("."):
            json.loads(path.read_text())  # every output under its final name is whole
    assert (run / "report.html").is_file()
