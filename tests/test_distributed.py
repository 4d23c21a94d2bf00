"""torchrun with gloo on the CPU: two ranks give exactly the single-process results, and rank 0 merges the shards."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.toyworld import write_scenes

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "random:tiny", "--quiet", "--set", "ascend.iterations=8", "--set", "ascend.candidates=4",
        "--set", "ascend.bank_size=8", "--set", "ascend.views=4", "--set", "decode.min_frequency=1",
        "--set", "surgery.single_resolution=64", "--set", "ascend.batch_size=2", "--set", "surgery.batch_size=2"]


def _load(run, sub, ext):
    return {p.stem: p for p in sorted((run / sub).glob(f"*.{ext}"))}


def test_torchrun_two_ranks_match_one_process(tmp_path):
    write_scenes(tmp_path / "imgs", 0, 5)
    (tmp_path / "imgs" / "truth.json").unlink()
    (tmp_path / "imgs" / "broken.png").write_bytes(b"nope")
    common = ["--input", str(tmp_path / "imgs"), "--output", str(tmp_path / "out"), *ARGS]
    one = subprocess.run([sys.executable, "runall.py", *common, "--run-name", "one"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 1, one.stderr[-3000:]  # the broken file fails in both
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "runall.py", *common, "--run-name", "two"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert two.returncode != 0 and "broken.png" in (tmp_path / "out" / "two" / "report.html").read_text(), two.stderr[-3000:]
    a, b = tmp_path / "out" / "one", tmp_path / "out" / "two"

    recs = [json.loads(x) for x in (b / "manifest.jsonl").read_text().splitlines()]
    assert not list((b / "manifests").glob("*.jsonl"))  # rank 0 merged the shards
    ids = [json.loads(x)["id"] for x in (b / "images.jsonl").read_text().splitlines()]
    broken = next(i for i in ids if i.startswith("broken"))
    for stage in ("ascend", "decode", "surgery"):
        mine = [r for r in recs if r["stage"] == stage]
        expected = ids if stage == "ascend" else [i for i in ids if i != broken]  # later stages skip the failed file
        assert sorted(r["image"] for r in mine) == sorted(expected)  # each image once, on one rank
        assert {r["rank"] for r in mine} == {0, 1}  # both ranks worked
    assert sum(r["stage"] == "report" for r in recs) == 1

    for sub in ("ascend", "labels", "surgery"):
        assert _load(a, sub, "json").keys() == _load(b, sub, "json").keys() and _load(a, sub, "json")
    for stem, path in _load(a, "ascend", "json").items():
        x, y = json.loads(path.read_text()), json.loads((b / "ascend" / path.name).read_text())
        assert x["words"] == y["words"] and [c["ids"] for c in x["candidates"]] == [c["ids"] for c in y["candidates"]]
    for stem, path in _load(a, "labels", "json").items():
        x, y = json.loads(path.read_text()), json.loads((b / "labels" / path.name).read_text())
        assert [(d["word"], d["frequency"]) for d in x["labels"]] == [(d["word"], d["frequency"]) for d in y["labels"]]
        assert np.allclose([d["score"] for d in x["labels"]], [d["score"] for d in y["labels"]], atol=1e-3)
    for stem, path in _load(a, "surgery", "npz").items():
        with np.load(path) as x, np.load(b / "surgery" / path.name) as y:
            assert x.files == y.files
            for k in x.files:
                assert np.allclose(x[k].astype(np.float32), y[k].astype(np.float32), atol=2e-3), k
    assert (a / "records.csv").read_text() == (b / "records.csv").read_text()
