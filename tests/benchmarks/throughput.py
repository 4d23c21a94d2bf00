"""Whole-pipeline throughput: one ``runall.py`` run over generated images, in a fresh process; prints JSON.

    python tests/benchmarks/throughput.py [--images 1024] [--side 512] [--model random:ViT-B/16]
                                        [--config configs/overnight.yaml] [--set KEY=VALUE ...] [--out FILE]

Reports images per hour (wall time of the whole command, model load included), each
stage's seconds and share of that time, the time outside the stages (model load, start-up,
the gaps between stages), and for each per-image stage its time on the model and the
model's idle gaps between batches (waiting for inputs to be read, or for the batch before to
be written; the rest is the runner's own bookkeeping), the peak GPU memory and resident memory of
the run, and, measured apart in this process after the run, two CPU-bound costs the
stages carry: decoding every input image once at the model's resolution, and
re-encoding a sample of the PNGs the run wrote.
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

from jsonout import emit  # noqa: E402  (beside this script)
from pipeline.toy.world import SceneSpec, write_scenes  # noqa: E402

# runall.py in this process, then its peak memory (the CUDA figure only when CUDA was used).
WRAPPER = ("import resource, runpy, sys; sys.argv = ['runall.py'] + sys.argv[1:]\n"
           "try:\n    runpy.run_path('runall.py', run_name='__main__')\n"
           "except SystemExit:\n    pass\n"
           "import torch\n"
           "gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0\n"
           "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, gpu, file=sys.stderr)")


def cpu_costs(imgs: Path, run: Path, resolution: int, sample: int = 200) -> dict:
    """Seconds to decode every input once, and per PNG to re-encode a sample of the run's PNGs."""
    import cv2
    from PIL import Image

    files = sorted(imgs.glob("*.png"))
    t = time.time()
    for f in files:
        with Image.open(f) as im:
            im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    decode = time.time() - t
    pngs = sorted(run.rglob("*.png"))[:sample]
    t = time.time()
    for f in pngs:
        cv2.imencode(".png", cv2.imread(str(f)))
    encode = (time.time() - t) / max(1, len(pngs))
    return {"decode_all_inputs_seconds": round(decode, 2), "pngs_written": len(list(run.rglob("*.png"))),
            "png_encode_seconds_each": round(encode, 4)}


def _gaps(s: dict) -> dict:
    """A per-image stage's time on the model, and the model's idle gaps between batches: waiting for a
    batch's inputs to be read, or for the batch before to be written (``pipeline.run.runner.run_per_image``)."""
    if not s.get("model_seconds"):
        return {}
    return {"model_seconds": round(s["model_seconds"], 2), "input_wait_seconds": round(s["input_wait_seconds"], 2),
            "output_wait_seconds": round(s["output_wait_seconds"], 2),
            "other_seconds": round(s["seconds"] - s["model_seconds"] - s["input_wait_seconds"]
                                   - s["output_wait_seconds"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--side", type=int, default=512, help="side of the generated input images")
    ap.add_argument("--model", default="random:ViT-B/16")
    ap.add_argument("--config", type=Path, default=None, help="a config file, as runall.py --config")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="a config override, as runall.py --set")
    ap.add_argument("--keep", type=Path, default=None, help="write the images and the run here instead of a temporary folder")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        where = args.keep or Path(tmp)
        imgs, run = where / "imgs", where / "run"
        t = time.time()
        write_scenes(imgs, 0, args.images, SceneSpec(size=args.side))
        (imgs / "truth.json").unlink()
        generate = time.time() - t
        sets = [x for s in args.sets for x in ("--set", s)]
        if args.config is not None:
            sets = ["--config", str(args.config.resolve()), *sets]
        t = time.time()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, "--input", str(imgs), "--output", str(run),
                               "--model", args.model, "--quiet", "--json", *sets],
                              cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t
        peak = next((x.split()[1:] for x in proc.stderr.splitlines() if x.startswith("PEAK")), None)
        try:
            summary = json.loads(proc.stdout)
        except json.JSONDecodeError:
            sys.exit(f"runall.py failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        stages = {s["stage"]: {"seconds": round(s["seconds"], 1), "share": round(s["seconds"] / wall, 4),
                               "done": s["done"], "failed": s["failed"], **_gaps(s)} for s in summary["stages"]}
        import torch

        from pipeline.model.load import RANDOM_ARCHS

        arch = RANDOM_ARCHS.get(args.model.removeprefix("random:"))
        resolution = arch[1] if arch else 224  # the decode cost below, at the model's input side

        out = {
            "model": args.model, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "images": args.images, "side": args.side, "config": args.config and args.config.name, "sets": args.sets, "exit_code": summary["exit_code"],
            "wall_seconds": round(wall, 1), "images_per_hour": round(args.images / wall * 3600),
            "stages": stages,
            "outside_stages_seconds": round(wall - sum(s["seconds"] for s in summary["stages"]), 1),
            "peak_rss_mib": round(int(peak[0]) / 1024) if peak else None,
            "peak_gpu_mib": round(int(peak[1]) / 2**20) if peak and int(peak[1]) else None,
            "generate_inputs_seconds": round(generate, 1),
            "cpu_costs": cpu_costs(imgs, run, resolution),
        }
    emit(out, args.out)


if __name__ == "__main__":
    main()
