"""Does a toy's image embedding carry shape at all? A linear probe beside zero-shot.

Zero-shot reads shape off the image embedding through the 36 caption embeddings. When it
fails, either the embedding holds the shape and the captions point elsewhere (a linear probe
trained on the embedding then does much better than zero-shot), or the vision tower never
put the shape there (the probe fails as zero-shot does). The probe is a 6-way logistic
regression on the standardised embedding, fitted on single-object scenes of the training
and varied renderers (a scene stream that neither training nor the held-out sets draw), and
scored on 500 held-out scenes of each renderer beside the zero-shot shape accuracy.

    python tests/benchmarks/probe.py --models toy --train 3000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from heldout import heldout_scenes  # noqa: E402  (beside this script)
from pipeline.model.load import load_model  # noqa: E402
from pipeline.toy.train import held_out_single_objects, image_embeddings, zero_shot_accuracy  # noqa: E402
from pipeline.toy.world import SHAPES, SceneSpec, make_scene, scene_rng  # noqa: E402
from tests.benchmarks.jsonout import emit  # noqa: E402

PROBE_SEED = 424_242  # a scene stream of its own: training draws "train", the held-out sets their own seeds


def embeddings(model: torch.nn.Module, scenes: list, batch: int = 256) -> torch.Tensor:
    """``[N, D]`` image embeddings, as zero-shot reads them (``image_embeddings``), a batch at a time."""
    with torch.no_grad():
        return torch.cat([image_embeddings(model, scenes[i : i + batch], torch.device("cpu"))
                          for i in range(0, len(scenes), batch)])


def shapes_of(scenes: list) -> torch.Tensor:
    return torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])


def fit_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4) -> Callable[[torch.Tensor], torch.Tensor]:
    """A multinomial logistic regression on standardised ``x``, fitted by L-BFGS; returns ``predict(x) -> labels``."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy((x - mu) / sd @ w + b, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: ((z - mu) / sd @ w + b).argmax(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toy"], help="'toy' or toy checkpoints' paths")
    ap.add_argument("--train", type=int, default=3000, help="probe-fitting scenes per renderer (training and varied)")
    ap.add_argument("--scenes", type=int, default=500, help="held-out scenes per renderer")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    device = torch.device("cpu")
    fit = []
    for style in ("train", "varied"):
        spec = SceneSpec(min_objects=1, max_objects=1, style=style, max_scale=0.45)
        fit += [make_scene(scene_rng(PROBE_SEED, i, style), spec) for i in range(args.train)]
    tests = {"train_style": held_out_single_objects(args.scenes, "train"),
             "alt_style": held_out_single_objects(args.scenes, "alt"),
             "varied_style": held_out_single_objects(args.scenes, "varied"),
             "heldout_renderer": heldout_scenes(args.scenes)}
    rows = []
    for name in args.models:
        model = load_model(name, device, precision="fp32").model
        x, y = embeddings(model, fit), shapes_of(fit)
        predict = fit_probe(x, y)
        row = {"model": name, "probe_fit_accuracy": round(float((predict(x) == y).float().mean()), 4), "shape": {}}
        for key, scenes in tests.items():
            probe = float((predict(embeddings(model, scenes)) == shapes_of(scenes)).float().mean())
            row["shape"][key] = {"linear_probe": round(probe, 4), "zero_shot": zero_shot_accuracy(model, scenes, device)["shape"]}
        rows.append(row)
    emit({"device": "cpu", "threads": torch.get_num_threads(), "fit_scenes": len(fit), "held_out_scenes": args.scenes,
          "models": rows}, args.out)


if __name__ == "__main__":
    main()
