"""The toy's vision tower trained from scratch under a time limit, for one unattended call on a GPU; JSON out.

    python tests/benchmarks/gpu_toytrain.py --out DIR [--minutes 5.5] [--surgery-share 0.2] [--workers N]
                                           [--start-from CKPT] [--steps N] [--surgery-steps N]
                                           [--batch-size N] [--checkpoint-seconds 60] [--resume]

Two phases, as the shipped toy was made: ``scratch-gpu`` (a fresh vision tower against the frozen text tower of
``--start-from``, by default the shipped toy, on training-style, varied and alt scenes drawn by ``--workers``
processes; never the benchmarks' held-out renderer), then ``scratch-surgery-gpu`` (the same, continued with the
surgery-map term). The phases share ``--minutes`` of training: the first gets all but ``--surgery-share`` of it,
the second that share (start-up and the held-out evaluations come on top). Each phase stops at its limit after the step it is on, and writes a resumable checkpoint every
``--checkpoint-seconds`` and at its end, so a call cut off still leaves a model. Without ``--steps`` (and
``--surgery-steps``), a phase takes the recipe's steps or as many as the workers can draw scenes for in 85% of its
time, whichever is fewer (one batch is timed first), so its learning-rate schedule runs to its end: ``DIR/scratch.pt`` after the
first phase, ``DIR/toy-clip-scratch.pt`` (and its card, ``.json``) after the second. ``DIR/toytrain.json``,
rewritten after each phase, holds each phase's recipe, steps, where a limit stopped it, seconds and held-out
curve (zero-shot on the stream ``toy train`` evaluates on), and the device. Scoring the model on all four renderers
(``probe.py``, ``heldout.py``, ``regions.py``) is a CPU job afterwards.

On a CPU at a tiny scale (``--steps 3 --surgery-steps 2 --batch-size 8``) it checks the whole call in seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from jsonout import emit  # noqa: E402  (beside this script)
from pipeline.model.load import TOY_CHECKPOINT, resolve_device  # noqa: E402
from pipeline.toy.train import resolve_recipe, save_toy_checkpoint, train_toy_clip  # noqa: E402

PHASES = ("scratch-gpu", "scratch-surgery-gpu")


def commit() -> str | None:
    """The checkout's commit, when it is a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


FEED_SHARE = 0.85  # of a phase's time, what the steps are sized to take when drawing scenes is what bounds them


def batch_seconds(cfg) -> float:
    """Seconds one process takes to draw a batch of the recipe's scenes (the mean of two)."""
    from pipeline.toy.train import _batch
    from pipeline.toy.world import SceneSpec

    spec = SceneSpec(size=cfg.arch.image_resolution, max_scale=cfg.max_scale, style=cfg.style)
    t = time.perf_counter()
    for k in range(2):
        _batch(cfg.seed, k, cfg, spec, cfg.arch.context_length)
    return (time.perf_counter() - t) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for the checkpoints and toytrain.json")
    ap.add_argument("--minutes", type=float, default=5.5, help="both phases' time, in minutes")
    ap.add_argument("--surgery-share", type=float, default=0.2, help="the second phase's share of --minutes")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1), help="scene-drawing processes")
    ap.add_argument("--start-from", type=Path, default=TOY_CHECKPOINT, help="the toy whose text tower is kept")
    ap.add_argument("--steps", type=int, default=None, help="the first phase's steps (default: the recipe's)")
    ap.add_argument("--surgery-steps", type=int, default=None, help="the second phase's steps (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=None, help="scenes per step (default: the recipes')")
    ap.add_argument("--checkpoint-seconds", type=float, default=60.0)
    ap.add_argument("--resume", action="store_true", help="continue each phase from its checkpoint in --out")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if not 0 < args.surgery_share < 1:
        ap.error(f"--surgery-share must be between 0 and 1, got {args.surgery_share}")

    args.out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(args.device)
    begin = time.time()
    budget = 60 * args.minutes  # seconds of training, both phases
    report: dict = {"device": "cpu" if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                    "commit": commit(), "minutes": args.minutes, "workers": args.workers, "phases": {}}
    start_from, outputs = args.start_from.resolve(), ("scratch.pt", "toy-clip-scratch.pt")
    for k, (recipe, name) in enumerate(zip(PHASES, outputs)):
        limit = budget * (1 - args.surgery_share if k == 0 else args.surgery_share)
        steps = args.steps if k == 0 else args.surgery_steps
        _, cfg = resolve_recipe(recipe, dev, steps=steps, batch_size=args.batch_size, workers=args.workers,
                                start_from=str(start_from))
        ckpt = args.out / f"{Path(name).stem}.ckpt"
        sized = None
        if args.resume and ckpt.is_file():  # a resumed phase keeps the steps it was sized to
            cfg = replace(cfg, steps=torch.load(ckpt, map_location="cpu", weights_only=False)["recipe"]["steps"])
        elif steps is None:  # as many steps as the scene-drawing workers can feed in the time, so the schedule ends
            sized = batch_seconds(cfg)
            cfg = replace(cfg, steps=max(1, min(cfg.steps, int(FEED_SHARE * limit * max(1, args.workers) / sized))))

        def progress(step: int, loss: float, metrics: dict | None, recipe: str = recipe) -> None:
            if metrics or step % 100 == 0:
                print(f"{recipe} step {step + 1}: loss {loss:.4f} {metrics or ''}", file=sys.stderr, flush=True)

        state, card = train_toy_clip(cfg, dev, progress, checkpoint=ckpt, resume=args.resume, time_limit=limit,
                                     checkpoint_seconds=args.checkpoint_seconds)
        save_toy_checkpoint(args.out / name, state, {**card, "recipe": {**card["recipe"], "name": recipe}})
        report["phases"][recipe] = {"limit_seconds": round(limit, 1), "steps": cfg.steps,
                                    "batch_seconds_one_worker": sized and round(sized, 3),
                                    "stopped_at": card["stopped_at"], "batch_size": cfg.batch_size,
                                    "train_seconds": card["train_seconds"], "history": card["history"],
                                    "checkpoint": name}
        report["seconds"] = round(time.time() - begin, 1)
        emit(report, args.out / "toytrain.json", show=False)
        start_from = args.out / name
    emit(report, args.out / "toytrain.json")


if __name__ == "__main__":
    main()
