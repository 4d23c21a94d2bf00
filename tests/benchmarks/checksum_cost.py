"""What the manifest's checksums cost a finished run: its outputs hashed again, against the run's own time. Prints JSON.

    python tests/benchmarks/checksum_cost.py --run outputs/demo [--repeat 3]

For every done record of the run's latest command it computes ``RunDir.output_sums`` (each
output's size and BLAKE2b checksum, as the runner does when it records the image) and
compares the total with the seconds the run's stages took, from the same manifest. The
files are in the page cache, as they are when the runner hashes them right after writing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipeline.run.rundir import RunDir  # noqa: E402
from tests.benchmarks.jsonout import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=3, help="hash everything this many times; the best is kept")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    run = RunDir(args.run)
    done = [r for r in run.latest().values() if r["status"] == "done"]
    stage_seconds = sum(float(r.get("seconds") or 0) for r in done)
    files = [p for r in done for p in r.get("outputs", [])]
    best = None
    for _ in range(args.repeat):
        t = time.perf_counter()
        for r in done:
            run.output_sums(r.get("outputs", []))
        took = time.perf_counter() - t
        best = took if best is None else min(best, took)
    size = sum((run.file(p).stat().st_size for p in files))
    emit({"run": str(args.run), "images": len({r['image'] for r in done if r.get('image')}), "records": len(done),
          "files": len(files), "mib": round(size / 2**20, 1), "hash_seconds": round(best, 3),
          "stage_seconds": round(stage_seconds, 1), "share_of_stage_time": round(best / stage_seconds, 5) if stage_seconds else None,
          "command": " ".join(sys.argv)}, args.out)


if __name__ == "__main__":
    main()
