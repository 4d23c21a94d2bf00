"""A run of N images (100,000 by default) made on disk without a model, then timed: the rerun with nothing to do,
`status` and `status --verify`; each in a fresh process, with its peak memory. Prints JSON.

    python tests/benchmarks/verify_scale.py [--images 100000] [--keep DIR]

Each image gets what a run with `surgery.overlays: false` writes (the overnight config's
choice at scale): its opinion JSON and CSV, labels, surgery JSON, npz maps and map atlas,
and done manifest records with sizes, checksums, fingerprints and record ids, as the
runner writes them; the inputs are hard links to one small PNG. Then, each as its own
`python runall.py` command:

1. ``first``: `rank`, `export` and `report` run over the whole run (what the run's end
   would have done); per-image stages skip every image;
2. ``rerun``: the same again, with nothing to do (the figure the README quotes), and whether it found the run as
   the first command's clean finish left it (``unchanged_path``, ``pipeline.run.clean``);
3. ``status``: `status --json`, every image's state per stage (each output checked to exist at its size);
4. ``verify``: `status --verify`, re-reading every output's bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WORDS = [f"word{i}" for i in range(400)] + ["sprinkorange", "breakfabeatrice", "abhinpassenger"]
METHODS = ["raw", "surgery", "single"]


def build(root: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    from pipeline.run.config import to_dict
    from pipeline.run.images import ImageRef, image_id
    from pipeline.run.provenance import Provenance
    from pipeline.run.rundir import RunDir, atomic_write_text
    from stages import RESULT_KEYS, STAGES, RunConfig

    cfg = to_dict(RunConfig(model="random:tiny"))
    cfg["surgery"]["overlays"] = False
    cfg["surgery"]["contact_sheet"] = False
    cfg["report"]["thumbnail_side"] = 0
    run = RunDir(root / "run")
    prov = Provenance(cfg, RESULT_KEYS, {k: s.needs for k, s in STAGES.items()})
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    Image.new("RGB", (64, 48), (120, 30, 200)).save(root / "seed.png")
    refs = [ImageRef(id=image_id(f"img_{i:06d}.png"), path=str(imgs / f"img_{i:06d}.png"), rel=f"img_{i:06d}.png",
                     root=str(imgs.resolve())) for i in range(n)]
    for i, ref in enumerate(refs):
        seed = root / f"seed{i // 50000}.png"  # a file takes at most 65,000 links
        if not seed.exists():
            shutil.copy(root / "seed.png", seed)
        (imgs / ref.rel).hardlink_to(seed)
    run.save_images(refs)
    run.save_config(cfg)
    prov.record(run)
    for sub in ("ascend", "labels", "surgery"):
        run.file(sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i, ref in enumerate(refs):
        words = {WORDS[(i * 7 + k) % len(WORDS)]: {"frequency": 20 - k} for k in range(20)}
        labels = [{"word": w, "frequency": d["frequency"], "score": 0.2, "rank": r}
                  for r, (w, d) in enumerate(list(words.items())[:10], 1)]
        run.opinion(ref.id).write_text(json.dumps({"words": words, "candidates": []}))
        run.opinion_csv(ref.id).write_text("Token,Frequency,Temperature,Iteration\n" +
                                           "".join(f"{w},{d['frequency']},1000,400\n" for w, d in words.items()))
        run.labels(ref.id).write_text(json.dumps({"image": ref.id, "labels": labels, "prompts": []}))
        if i % 400 < len(WORDS) // 20:  # a new npz and atlas now and then; between them, copies (faster to build)
            arrays = {f"{m}/{d['word']}": rng.random((14, 14)).astype(np.float16) for m in METHODS for d in labels}
            buf = io.BytesIO()
            np.savez_compressed(buf, **arrays)
            npz = buf.getvalue()
            buf = io.BytesIO()
            Image.fromarray((rng.random((140, 42)) * 255).astype(np.uint8)).save(buf, format="PNG")
            png = buf.getvalue()
        run.maps(ref.id).write_bytes(npz)
        atlas = run.atlas(ref.id)
        atlas.write_bytes(png)
        run.heatmaps(ref.id).write_text(json.dumps({
            "image": ref.id, "size": [64, 48], "methods": METHODS, "labels": [
                {"word": d["word"], "slug": d["word"], "overlays": {}, "points": [], "point_labels": [],
                 "range": {m: [0.1, 0.3] for m in METHODS}} for d in labels],
            "atlas": {"path": run.rel(atlas), "cell": [14, 14], "grids": {m: [14, 14] for m in METHODS}}}))
        outputs = {"ascend": [run.rel(run.opinion(ref.id)), run.rel(run.opinion_csv(ref.id))],
                   "decode": [run.rel(run.labels(ref.id))],
                   "surgery": [run.rel(run.heatmaps(ref.id)), run.rel(run.maps(ref.id)), run.rel(atlas)]}
        rids = {}
        for stage, outs in outputs.items():
            rids[stage] = f"{stage[:2]}{i:014x}"
            rec = {"image": ref.id, "path": ref.path, "stage": stage, "status": "done", "error": None, "seconds": 1.0,
                   "outputs": outs, "sums": run.output_sums(outs), "rid": rids[stage],
                   "upstream": {need: rids[need] for need in STAGES[stage].needs}, "provenance": prov.expected[stage],
                   "session": "2026-12-01T00:00:00Z"}
            lines.append(json.dumps(rec))
    atomic_write_text(run.file("manifest.jsonl"), "".join(line + "\n" for line in lines))


# The peak is the command's own (VmHWM): getrusage's ru_maxrss in a child starts from this process's size at the
# fork, and this one holds the build's memory.
PROBE = ("import runpy, sys, time; sys.argv = ['runall.py'] + sys.argv[1:]; t = time.time()\n"
         "try:\n    runpy.run_path('runall.py', run_name='__main__')\nexcept SystemExit as e:\n    pass\n"
         "print('SECONDS', time.time() - t)\n"
         "print('MAXRSS', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))")


def timed(args: list[str]) -> dict:
    t = time.time()
    out = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=ROOT, capture_output=True, text=True)
    get = lambda key: next((float(x.split()[1]) for x in out.stdout.splitlines() if x.startswith(key)), None)  # noqa: E731
    rss = get("MAXRSS")
    return {"seconds": round(time.time() - t, 1), "command_seconds": round(get("SECONDS") or 0, 1),
            "peak_rss_mib": round(rss / 1024, 1) if rss else None, "exit": out.returncode,
            "tail": (out.stdout + out.stderr)[-600:] if out.returncode not in (0, 1) else ""}


def stage_seconds(run: Path, session_after: int) -> dict:
    recs = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()][session_after:]
    return {r["stage"]: r["seconds"] for r in recs if r.get("image") is None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=100000)
    ap.add_argument("--keep", type=Path, default=None, help="build here and keep it (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    from tests.benchmarks.jsonout import emit

    root = args.keep or Path(tempfile.mkdtemp())
    out: dict = {"images": args.images, "command": " ".join(sys.argv)}
    try:
        t = time.time()
        build(root, args.images)
        out["build_seconds"] = round(time.time() - t, 1)
        run = root / "run"
        for name in ("first", "rerun"):
            n = len((run / "manifest.jsonl").read_text().splitlines())
            out[name] = timed(["--input", str(root / "imgs"), "--output", str(root), "--run-name", "run", "--quiet",
                               "--set", "surgery.overlays=false", "--set", "surgery.contact_sheet=false",
                               "--set", "report.thumbnail_side=0", "--model", "random:tiny"])
            out[name]["stages"] = stage_seconds(run, n)
            # whether it took the clean finish's path (pipeline.run.clean): the log's line for this command says so
            starts = [x for x in (run / "run.log").read_text().splitlines() if " INFO run " in x]
            out[name]["unchanged_path"] = "unchanged since its last clean finish" in starts[-1]
        out["status"] = timed(["status", "--run", str(run), "--json"])
        out["verify"] = timed(["status", "--run", str(run), "--verify", "--json"])
        emit(out, args.out)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
