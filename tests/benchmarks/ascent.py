"""Ascent speed: this stage against a loop faithful to the original, in one run; prints JSON.

    python tests/benchmarks/ascent.py [--model toy|random:ViT-B/32|random:openclip:ViT-B-32|...] [--device auto] [--images 8] [--iterations 400]
                                      [--methods gumbel pez] [--batches 0 16 64] [--recall 0]
                                      [--faithful-iterations N] [--profile] [--versus MODEL] [--out FILE]

The faithful loop exists only here, for comparison: a fresh model load per image,
64 views re-encoded every step, the dense one-hot over all 77 positions, the full
text transformer, fp32, one image at a time.

``--batches`` times the stage at each batch size (0 = the stage's automatic size, the
rule ``runall.py`` uses), over that many images (at least ``--images``), with the
peak GPU memory of each. ``--faithful-iterations N`` runs the faithful loop for N
iterations and scales its time to ``--iterations`` (the loop's cost per iteration is
constant; the JSON says so). ``--profile`` adds, at each batch size, the view bank's
seconds per image and one loop iteration's milliseconds measured apart, then a
``torch.profiler`` view of 20 iterations at the first size: the kernels with the most
device time, the operators with the most host time, and device busy time against wall time.
``--versus MODEL`` times the stage on a second model with the same settings and images,
the two interleaved over ``--rounds`` rounds, and reports ``--model``'s time over
``MODEL``'s: with ``--model random:openclip:ViT-B-32 --versus random:ViT-B/32`` (the
same architecture in the two backends) the ratio is the model adapter's cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kornia.augmentation as K  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.run.images import normalize, to_tensor  # noqa: E402
from pipeline.model.load import load_model, resolve_device  # noqa: E402
from pipeline.run.batching import fit_batch  # noqa: E402
from pipeline.model.tokens import vocab  # noqa: E402
from jsonout import emit  # noqa: E402  (beside this script)
from toyeval import ascent_recall  # noqa: E402  (beside this script)
from pipeline.toy.train import held_out_single_objects  # noqa: E402
from stages.ascend import (AUTO_BATCH_CPU, AUTO_BATCH_CUDA, AscentConfig, _encode_views, ascent_bytes_per_image,  # noqa: E402
                           extract_opinions)


def faithful_loop(name: str, dev: torch.device, image: torch.Tensor, iterations: int) -> None:
    """The original's per-image loop (fp32, reloaded model, dense one-hot, 64 fresh views per step)."""
    lm = load_model(name, dev, precision="fp32")
    model, v = lm.model, vocab()
    ctx = model.positional_embedding.shape[0]
    V = model.token_embedding.weight.shape[0]
    logits = torch.randn(16, 5, V, device=dev, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=5)
    aug = K.RandomAffine(degrees=10, translate=(0.1, 0.1), p=0.8)
    sot = F.one_hot(torch.tensor([v.sot], device=dev), V).float().expand(16, 1, V)
    pad = F.one_hot(torch.full((ctx - 6,), v.eot, device=dev), V).float().expand(16, ctx - 6, V)
    for _ in range(iterations):
        with torch.no_grad():
            views = F.normalize(model.encode_image(normalize(aug(image[None].expand(64, -1, -1, -1)))), dim=-1)
        y = F.gumbel_softmax(logits, tau=1000, hard=True)
        x = torch.cat([sot, y, pad], 1) @ model.token_embedding.weight + model.positional_embedding  # [16, 77, W]
        if lm.clip.backend == "open_clip":  # batch-first blocks, the causal mask on the model
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        else:
            x = model.ln_final(model.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        f = F.normalize(x[:, 5 + 2] @ model.text_projection, dim=-1)  # the original's second-EOT read-out
        loss = (-100 * f @ views.T).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()


def auto_batch(lm, cfg: AscentConfig) -> int:
    """The stage's automatic batch size on this device (``BatchSizer.size`` with ``batch_size: 0``)."""
    if lm.device.type != "cuda":
        return AUTO_BATCH_CPU
    free, _ = torch.cuda.mem_get_info(lm.device)
    return fit_batch(free, ascent_bytes_per_image(cfg, lm.model.token_embedding.weight.shape[0]), AUTO_BATCH_CUDA)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_stage(lm, imgs: torch.Tensor, batch: int, cfg: AscentConfig) -> dict:
    """Seconds per image of ``extract_opinions`` over ``imgs`` in batches of ``batch``, and the peak GPU memory."""
    dev = lm.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    sync(dev)
    t = time.time()
    for start in range(0, len(imgs), batch):
        extract_opinions(lm, imgs[start : start + batch], list(range(start, min(start + batch, len(imgs)))), cfg)
    sync(dev)
    row = {"batch": batch, "images": len(imgs), "seconds_per_image": round((time.time() - t) / len(imgs), 4)}
    if dev.type == "cuda":
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
    return row


def profile_steps(lm, imgs: torch.Tensor, cfg: AscentConfig, top: int = 15) -> dict:
    """Where a short ascent's time goes (``torch.profiler``): the kernels with the most device time,
    the operators with the most host time, and the device's busy time against the wall time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = lm.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync(lm.device)
    t = time.time()
    with profile(activities=acts) as prof:
        extract_opinions(lm, imgs, list(range(len(imgs))), cfg)
        sync(lm.device)
    wall = time.time() - t
    rows = prof.key_averages()
    kernels = [e for e in rows if cuda and e.device_type == DeviceType.CUDA]
    ops = [e for e in rows if e.device_type == DeviceType.CPU]
    busy = sum(e.self_device_time_total for e in kernels)

    def table(events, key: str) -> list[dict]:
        total = sum(getattr(e, key) for e in events) or 1
        return [{"op": e.key[:90], "calls": e.count, "self_ms": round(getattr(e, key) / 1e3, 2),
                 "share": round(getattr(e, key) / total, 4)}
                for e in sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]]

    return {"wall_ms_profiled": round(wall * 1e3, 1), "device_busy_ms": round(busy / 1e3, 1),
            "kernels": table(kernels, "self_device_time_total"), "host_ops": table(ops, "self_cpu_time_total")}


def breakdown(lm, imgs: torch.Tensor, cfg: AscentConfig, short: int = 20, long: int = 120) -> dict:
    """The stage's two costs apart: the view bank per image, and one loop iteration for the batch
    (the difference of a long and a short run with a 16-view bank, so that the bank drops out)."""
    dev = lm.device
    sync(dev)
    t = time.time()
    for b in range(len(imgs)):
        _encode_views(lm, imgs[b].to(dev), cfg, b)
    sync(dev)
    bank = (time.time() - t) / len(imgs)

    def timed(iterations: int) -> float:
        small = replace(cfg, iterations=iterations, bank_size=16, views=16)
        sync(dev)
        t = time.time()
        extract_opinions(lm, imgs, list(range(len(imgs))), small)
        sync(dev)
        return time.time() - t

    timed(2)  # warm-up at this batch's shapes
    per_it = (timed(long) - timed(short)) / (long - short)
    return {"batch": len(imgs), "bank_size": cfg.bank_size, "bank_seconds_per_image": round(bank, 4),
            "iteration_ms": round(per_it * 1e3, 2),
            "loop_seconds_per_image": round(per_it * cfg.iterations / len(imgs), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="model precision on CUDA")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--faithful-images", type=int, default=1, help="images timed with the faithful loop (0 = skip it)")
    ap.add_argument("--faithful-iterations", type=int, default=None,
                    help="iterations the faithful loop runs; its time is scaled to --iterations (default: all of them)")
    ap.add_argument("--batches", type=int, nargs="+", default=[0],
                    help="stage batch sizes to time (0 = the automatic size); each over max(--images, size) images")
    ap.add_argument("--methods", nargs="+", default=["gumbel", "pez"], choices=["gumbel", "pez"])
    ap.add_argument("--recall", type=int, default=0, help="also the true-word recall on N held-out toy scenes (toy model only)")
    ap.add_argument("--no-stage", action="store_true", help="skip the stage timings (with --profile: only the breakdown)")
    ap.add_argument("--profile", action="store_true", help="the bank and the loop apart, and a profile of 20 iterations")
    ap.add_argument("--versus", default=None, help="a second model timed with the same settings, interleaved")
    ap.add_argument("--rounds", type=int, default=3, help="with --versus: interleaved rounds of the two models")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    lm = load_model(args.model, dev, precision=args.precision)
    res = lm.input_resolution
    base = AscentConfig(iterations=args.iterations)
    sizes = [b or auto_batch(lm, base) for b in args.batches]
    n = max([args.images, *sizes])
    scenes = held_out_single_objects(n)
    imgs = torch.stack([to_tensor(Image.fromarray(s.image), res) for s in scenes])
    extract_opinions(lm, imgs[:1], [0], AscentConfig(iterations=2, bank_size=16, views=8))  # warm-up
    out = {
        "model": args.model, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(lm.dtype), "iterations": args.iterations, "candidates": base.candidates, "tokens": base.tokens,
        "automatic_batch": sizes[args.batches.index(0)] if 0 in args.batches else None,
    }

    def save() -> None:  # the figures so far, so a run stopped at a time limit keeps them
        emit(out, args.out, show=False)

    stage: dict[str, list] = {}
    out["stage"] = stage
    for method in args.methods:
        cfg = AscentConfig(method=method, iterations=args.iterations)
        stage[method] = []
        for b in sizes if not args.no_stage else []:
            stage[method].append(time_stage(lm, imgs[: max(args.images, b)], b, cfg))
            save()
    if args.faithful_images:
        its = args.faithful_iterations or args.iterations
        sync(dev)
        t = time.time()
        for i in range(args.faithful_images):
            faithful_loop(args.model, dev, imgs[i].to(dev), its)
        faithful = (time.time() - t) / args.faithful_images * args.iterations / its
        out["faithful"] = {"seconds_per_image": round(faithful, 3), "iterations_run": its,
                           "scaled_to": args.iterations if its != args.iterations else None}
        out["speedup_at_best_batch"] = {m: round(faithful / min(r["seconds_per_image"] for r in rows), 2)
                                        for m, rows in stage.items() if rows}
        save()
    if args.profile:  # the bank and the loop apart, then the loop's steady state under the profiler
        cfg = AscentConfig(method=args.methods[0], iterations=args.iterations)
        out["breakdown"] = [breakdown(lm, imgs[:b], cfg) for b in sizes]
        save()
        small = replace(cfg, iterations=20, bank_size=16, views=16)
        out["profile"] = {"batch": sizes[0], "iterations": small.iterations, "bank_size": small.bank_size,
                          **profile_steps(lm, imgs[: sizes[0]], small)}
        save()
    if args.versus:
        other = load_model(args.versus, dev, precision=args.precision)
        other_imgs = torch.stack([to_tensor(Image.fromarray(s.image), other.input_resolution) for s in scenes])
        extract_opinions(other, other_imgs[:1], [0], AscentConfig(iterations=2, bank_size=16, views=8))  # warm-up
        b = sizes[0]
        rows: dict[str, dict[str, list[float]]] = {}
        for method in args.methods:
            cfg = AscentConfig(method=method, iterations=args.iterations)
            times = rows.setdefault(method, {args.model: [], args.versus: []})
            for _ in range(args.rounds):
                for name, model, x in ((args.versus, other, other_imgs), (args.model, lm, imgs)):
                    times[name].append(time_stage(model, x[: max(args.images, b)], b, cfg)["seconds_per_image"])
        out["versus"] = {"model": args.model, "baseline": args.versus, "batch": b, "rounds": args.rounds, "methods": {
            m: {"seconds_per_image": {k: round(sum(v) / len(v), 4) for k, v in t.items()}, "each_round": t,
                "ratio": round(sum(t[args.model]) / sum(t[args.versus]), 4)} for m, t in rows.items()}}
        save()
    if args.recall:
        recall_scenes = held_out_single_objects(args.recall)
        out["recall"] = {m: ascent_recall(lm, recall_scenes, AscentConfig(method=m, iterations=args.iterations))
                         for m in args.methods}
        out["recall"]["scenes"] = args.recall
    emit(out, args.out)


if __name__ == "__main__":
    main()
