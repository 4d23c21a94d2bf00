"""Peak memory against the number of images: a whole run per size, each in a fresh process; prints JSON.

    python tests/benchmarks/memory.py [--sizes 25 100 400] [--model random:tiny]

Each run uses cheap stage settings (the cost per image does not matter here), so
the figure shows how resident memory grows with the run's size: images are decoded
a batch at a time and never all held at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pipeline.toy.world import SceneSpec, write_scenes  # noqa: E402

CHEAP = ["--set", "ascend.iterations=2", "--set", "ascend.candidates=2", "--set", "ascend.bank_size=4",
         "--set", "ascend.views=2", "--set", "decode.min_frequency=1", "--set", "surgery.single_resolution=64",
         "--set", "surgery.max_labels=2", "--set", "surgery.overlays=false"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 100, 400])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--side", type=int, default=256, help="side of the generated input images")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            imgs = Path(tmp) / f"imgs{n}"
            write_scenes(imgs, 0, n, SceneSpec(size=args.side))
            (imgs / "truth.json").unlink()
            code = ("import resource, runpy, sys; sys.argv = ['runall.py'] + sys.argv[1:]\n"
                    "try:\n    runpy.run_path('runall.py', run_name='__main__')\n"
                    "except SystemExit as e:\n    code = e.code\n"
                    "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
            t = time.time()
            out = subprocess.run([sys.executable, "-c", code, "--input", str(imgs), "--output", str(Path(tmp) / "out"),
                                  "--model", args.model, "--quiet", *CHEAP], cwd=ROOT, capture_output=True, text=True)
            rss = next((int(x.split()[1]) for x in out.stdout.splitlines() if x.startswith("MAXRSS")), None)
            rows.append({"images": n, "peak_rss_mib": round(rss / 1024, 1) if rss else None,
                         "seconds": round(time.time() - t, 1), "exit": out.returncode})
    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["rss_ratio_to_smallest"] = round(r["peak_rss_mib"] / base, 3) if base and r["peak_rss_mib"] else None
    print(json.dumps({"model": args.model, "image_side": args.side, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
