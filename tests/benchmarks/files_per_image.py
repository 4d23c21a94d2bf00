"""How many files a run writes per image under a config, and what that means at a million images; prints JSON.

    python tests/benchmarks/files_per_image.py [--config configs/overnight.yaml] [--images 6] [--out F]

Runs the whole pipeline (every stage, every export format the config names) on toy scenes with the toy model,
on the CPU and with cheap ascent settings (how many files a stage writes does not depend on how long it ascends),
then counts every file under the run directory: those named after an image, by folder, and the rest (whole-run
files, the report's page files). ``--set`` passes more settings, e.g. ``--set surgery.overlays=true``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.toy.world import SceneSpec, write_scenes  # noqa: E402
from tests.benchmarks.jsonout import emit  # noqa: E402

CHEAP = ["--model", "toy", "--set", "device=cpu", "--set", "precision=fp32", "--set", "ascend.iterations=4",
         "--set", "ascend.batch_size=4", "--set", "decode.min_frequency=1"]


def count(run: Path, ids: list[str], stems: dict[str, str]) -> dict:
    """Every file under ``run``: per image (a name holding the image's id, or the image's own name, as YOLO's
    are), by top folder (by format under ``export/``), and the rest."""
    per_folder: Counter = Counter()
    per_image: Counter = Counter()
    whole: Counter = Counter()
    for path in run.rglob("*"):
        if not path.is_file() and not path.is_symlink():
            continue
        rel = path.relative_to(run)
        folder = "/".join(rel.parts[:2 if rel.parts[0] == "export" and len(rel.parts) > 2 else 1]) if len(rel.parts) > 1 else "."
        owner = next((i for i in ids if i in path.name), None) or stems.get(path.name.split(".")[0])
        if owner is None:
            whole[folder] += 1
        else:
            per_image[owner] += 1
            per_folder[folder] += 1
    n = len(ids)
    return {"per_image": {f: round(c / n, 2) for f, c in sorted(per_folder.items())},
            "per_image_total": round(sum(per_folder.values()) / n, 2),
            "per_image_min_max": [min(per_image.values(), default=0), max(per_image.values(), default=0)],
            "whole_run": dict(sorted(whole.items())), "whole_run_total": sum(whole.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="configs/overnight.yaml")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="KEY=VALUE, as runall.py takes it")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        imgs = Path(tmp) / "imgs"
        write_scenes(imgs, 0, args.images, SceneSpec())
        (imgs / "truth.json").unlink()
        cmd = [sys.executable, "runall.py", "--input", str(imgs), "--output", str(Path(tmp) / "out"), "--run-name",
               "run", "--config", args.config, "--quiet", *CHEAP, *(x for kv in args.extra for x in ("--set", kv))]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        run = Path(tmp) / "out" / "run"
        if done.returncode != 0 or not run.is_dir():
            sys.exit(f"the run failed (exit {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        from pipeline.run.rundir import RunDir

        refs = RunDir(run).load_images()
        ids, stems = [ref.id for ref in refs], {Path(ref.rel).name.split(".")[0]: ref.id for ref in refs}
        out = {"config": args.config, "settings": ["model=toy", *CHEAP[3::2], *args.extra], "images": len(ids),
               "command": " ".join(sys.argv), **count(run, ids, stems)}
    out["million_images"] = {"per_image_files": round(out["per_image_total"] * 1_000_000),
                             "over_10_million": out["per_image_total"] * 1_000_000 > 10_000_000}
    emit(out, args.out)


if __name__ == "__main__":
    main()
