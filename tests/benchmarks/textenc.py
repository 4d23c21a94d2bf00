"""The prompt ensemble's text encoding: stock ``encode_text`` over all 77 positions against the causal prefix.

Encodes every template of a few words both ways, alternating, and prints JSON: each way's
seconds, their ratio and the largest difference of the unit features. ``--models`` takes
any ``--model`` name (``random:ViT-B/16`` needs no weights).

    python tests/benchmarks/textenc.py --models toy random:ViT-B/16 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipeline.model.load import load_model, resolve_device  # noqa: E402
from pipeline.model.prompts import TEMPLATES  # noqa: E402
from pipeline.model.textenc import encode_tokens  # noqa: E402
from pipeline.model.tokens import tokenize  # noqa: E402
from tests.benchmarks.jsonout import emit  # noqa: E402

WORDS = ["cat", "red circle", "mountain bike", "x", "a very long compound word"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["toy", "random:ViT-B/16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = []
    for name in args.models:
        model = load_model(name, device).model
        ids = tokenize([t.format(w) for w in WORDS for t in TEMPLATES], model.positional_embedding.shape[0]).to(device)
        stock, prefix = [], []
        with torch.no_grad():
            for _ in range(args.repeats):
                for way, out in ((model.encode_text, stock), (lambda x: encode_tokens(model, x), prefix)):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    f = F.normalize(way(ids).float(), dim=-1)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    out.append((time.perf_counter() - t, f))
        diff = max(float((a[1] - b[1]).abs().max()) for a, b in zip(stock, prefix))
        s, p = min(t for t, _ in stock), min(t for t, _ in prefix)
        rows.append({"model": name, "prompts": len(ids), "positions": ids.shape[1],
                     "longest_prefix": int(ids.argmax(-1).max()) + 1, "stock_seconds": round(s, 4),
                     "prefix_seconds": round(p, 4), "ratio": round(s / p, 2), "max_abs_diff": diff})
    emit({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "threads": torch.get_num_threads(), "repeats": args.repeats, "models": rows}, args.out)


if __name__ == "__main__":
    main()
