"""Checks that need a GPU; prints JSON. Not part of the test run (CI has no GPU).

    python tests/benchmarks/gpu_checks.py [--scenes 32] [--oom-model random:ViT-B/16] [--oom-images 0]
                                          [--oom-iterations 50] [--out FILE]

* ``precision``: the toy model's ascent (the original's settings) on held-out single-object
  scenes with the model in fp32 (all of it in fp32, and as the stage runs it, with bf16 for the
  text passes and the product with the vocabulary), fp16 and bf16: each one's recall of the
  true words, and how far its decode labels agree with the pure fp32 run's (the share of images
  with the same label set, and the mean Jaccard overlap), beside the pure fp32 run with other
  seeds, which shows how far the labels move with the random streams alone.
* ``compile``: the same fp16 run with the Gumbel passes compiled (as the stage runs on CUDA)
  and uncompiled: the share of candidates with the same tokens, and of images with the same labels.
* ``oom``: one batch of ``--oom-images`` through ``split_on_oom``, as the stage runs it, first
  at the full card (the automatic size must fit with no split), then with this process's GPU
  memory capped (``torch.cuda.set_per_process_memory_fraction``) so that the batch cannot
  fit: the sizes the back-off settled on, and whether every candidate equals the uncapped run's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ascent import auto_batch  # noqa: E402  (beside this script)
from jsonout import emit  # noqa: E402
from pipeline.run.images import to_tensor  # noqa: E402
from pipeline.model.load import load_model  # noqa: E402
from pipeline.run.batching import split_on_oom  # noqa: E402
from pipeline.toy.train import held_out_single_objects  # noqa: E402
from pipeline.model import choosers  # noqa: E402
from stages import ascend  # noqa: E402
from stages.ascend import AscentConfig, extract_opinions  # noqa: E402
from stages.decode import DecodeConfig, decode_labels  # noqa: E402


def images_for(lm, count: int) -> torch.Tensor:
    return torch.stack([to_tensor(Image.fromarray(s.image), lm.input_resolution) for s in held_out_single_objects(count)])


def _labels(ops) -> list[set[str]]:
    return [{d["word"] for d in decode_labels(op.words, DecodeConfig())} for op in ops]


def _agreement(ref: list[set[str]], other: list[set[str]]) -> dict:
    pairs = list(zip(ref, other))
    return {"same_labels": round(sum(a == b for a, b in pairs) / len(pairs), 4),
            "mean_jaccard": round(sum(len(a & b) / max(1, len(a | b)) for a, b in pairs) / len(pairs), 4)}


PRECISION_RUNS = {  # name: (model precision, everything in fp32, seed offset)
    "fp32_pure": ("fp32", True, 0),
    "fp32_pure_other_seeds": ("fp32", True, 1000),  # the control: how far labels move with the random streams alone
    "fp32": ("fp32", False, 0), "fp16": ("fp16", False, 0), "bf16": ("bf16", False, 0),
}


def precision_agreement(scenes: int, dev: torch.device, iterations: int = 400, runs: tuple[str, ...] = tuple(PRECISION_RUNS)) -> dict:
    """Labels of each precision against a pure fp32 run. With an fp32 model the stage still runs the
    text passes and the product with the vocabulary in bf16 on CUDA (``fast_dtype``); the reference
    keeps them in fp32. The same pure run with other seeds shows how much of the disagreement the
    random streams alone make: the ascent is chaotic, so any change of rounding changes them too."""
    cfg, labels, out = AscentConfig(iterations=iterations), {}, {}
    truth = [s.objects[0].words for s in held_out_single_objects(scenes)]
    for name in runs:
        precision, pure, offset = PRECISION_RUNS[name]
        lm = load_model("toy", dev, precision=precision)
        with mock.patch.object(ascend, "fast_dtype", lambda lm: lm.dtype) if pure else contextlib.nullcontext():
            ops = extract_opinions(lm, images_for(lm, scenes), [offset + i for i in range(scenes)], cfg)
        labels[name] = _labels(ops)
        out[name] = {"recall": {"colour": round(sum(c in ls for ls, (c, _) in zip(labels[name], truth)) / scenes, 4),
                                "shape": round(sum(s in ls for ls, (_, s) in zip(labels[name], truth)) / scenes, 4)}}
    for name in runs[1:]:
        out[name]["against_pure_fp32"] = _agreement(labels[runs[0]], labels[name])
    return {"scenes": scenes, "iterations": cfg.iterations, **out}


def compile_agreement(scenes: int, dev: torch.device, iterations: int = 400) -> dict:
    """The stage's compiled Gumbel passes against the same passes run as written, on the toy in fp16."""
    cfg, lm = AscentConfig(iterations=iterations), load_model("toy", dev, precision="fp16")
    imgs, seeds = images_for(lm, scenes), list(range(scenes))
    compiled = extract_opinions(lm, imgs, seeds, cfg)
    with mock.patch.object(choosers, "COMPILE_ON_CUDA", False):
        plain = extract_opinions(lm, imgs, seeds, cfg)
    pairs = [(x["ids"], y["ids"]) for a, b in zip(compiled, plain) for x, y in zip(a.candidates, b.candidates)]
    return {"scenes": scenes, "same_candidate_tokens": round(sum(x == y for x, y in pairs) / len(pairs), 4),
            **_agreement(_labels(plain), _labels(compiled))}


def oom_backoff(model: str, images: int, iterations: int, dev: torch.device) -> dict:
    lm = load_model(model, dev)
    cfg = AscentConfig(iterations=iterations)
    images = images or auto_batch(lm, cfg)
    imgs = images_for(lm, images)
    seeds = list(range(images))
    run = lambda a, b: extract_opinions(lm, imgs[a:b], seeds[a:b], cfg)  # noqa: E731

    def splits_of(fn) -> tuple[list, list[int]]:
        sizes: list[int] = []
        return split_on_oom(fn, 0, images, sizes.append), sizes

    out = {"model": model, "images": images, "iterations": iterations, "automatic_batch": auto_batch(lm, cfg)}
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    full, sizes = splits_of(run)
    peak = torch.cuda.max_memory_allocated(dev)
    out["full_card"] = {"splits": sizes, "peak_gpu_mib": round(peak / 2**20)}
    total = torch.cuda.get_device_properties(dev).total_memory
    cap = base + (peak - base) * 0.6  # the whole batch cannot fit; about half of it can
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    try:
        capped, sizes = splits_of(run)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
    same = all([c["ids"] for c in a.candidates] == [c["ids"] for c in b.candidates] for a, b in zip(full, capped))
    loss_diff = max(abs(x["loss"] - y["loss"]) for a, b in zip(full, capped) for x, y in zip(a.candidates, b.candidates))
    out["capped"] = {"cap_mib": round(cap / 2**20), "splits": sizes, "finished": len(capped) == images,
                     "identical_candidates": same, "max_loss_difference": round(loss_diff, 5)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--scenes", type=int, default=32)
    ap.add_argument("--oom-model", default="random:ViT-B/16")
    ap.add_argument("--oom-images", type=int, default=0, help="images in the one batch (0 = the automatic batch size)")
    ap.add_argument("--oom-iterations", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_checks.py needs a CUDA GPU")
    dev = torch.device("cuda", torch.cuda.current_device())
    out = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__}
    checks = {"precision": lambda: precision_agreement(args.scenes, dev),
              "compile": lambda: compile_agreement(args.scenes, dev),
              "oom": lambda: oom_backoff(args.oom_model, args.oom_images, args.oom_iterations, dev)}
    for name, check in checks.items():
        out[name] = check()
        emit(out, args.out, show=False)  # the checks so far, so a run stopped at a time limit keeps them
    emit(out, args.out)


if __name__ == "__main__":
    main()
