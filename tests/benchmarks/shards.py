"""Webdataset shards as input: clipsight's reader (``pipeline.run.shards``) against the ``webdataset`` package; JSON.

    python tests/benchmarks/shards.py [--samples 4000] [--shards 8] [--side 256]

Writes ``--shards`` tar shards of ``--samples`` JPEG samples in all (each with a ``.txt`` and a ``.json``
member, as img2dataset writes them), then, one after the other in this process:

* ``clipsight``: ``discover_images`` over the brace pattern (every shard's headers and metadata), then every
  sample's bytes read by offset and decoded with ``load_image``, in the run's order;
* ``clipsight_random``: the same reads in a shuffled order, as a resumed run or another rank reads them;
* ``webdataset``: ``webdataset.WebDataset`` over the same pattern, each sample's JPEG decoded by PIL the same
  way, streamed in order (the package reads a shard from its start; it has no read of one sample by itself).

Each gives seconds and samples per second. ``webdataset`` is not one of clipsight's dependencies: the script
says so when it is not installed.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from jsonout import emit  # noqa: E402  (beside this script)
from pipeline.run.images import _to_rgb, discover_images, load_image  # noqa: E402


def write_shards(folder: Path, samples: int, shards: int, side: int) -> str:
    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for k in range(s * per, min(samples, (s + 1) * per)):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("txt", f"sample {k}".encode()),
                                  ("json", json.dumps({"key": f"{k:09d}", "caption": f"sample {k}"}).encode())):
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    out: dict = {"samples": args.samples, "shards": args.shards, "side": args.side}
    with tempfile.TemporaryDirectory() as tmp:
        pattern = write_shards(Path(tmp), args.samples, args.shards, args.side)
        out["bytes"] = sum(p.stat().st_size for p in Path(tmp).glob("*.tar"))
        t = time.time()
        refs = discover_images(Path(pattern))
        listed = time.time() - t
        for name, order in (("clipsight", refs), ("clipsight_random", random.Random(0).sample(refs, len(refs)))):
            t = time.time()
            for ref in order:
                load_image(ref.path)
            seconds = time.time() - t + (listed if name == "clipsight" else 0.0)
            out[name] = {"seconds": round(seconds, 3), "samples_per_second": round(len(refs) / seconds, 1),
                         **({"listing_seconds": round(listed, 3)} if name == "clipsight" else {})}
        try:
            import webdataset as wds
        except ImportError:
            out["webdataset"] = "not installed (pip install webdataset to measure it)"
        else:
            t = time.time()
            n = 0
            for sample in wds.WebDataset(pattern, shardshuffle=False):
                with Image.open(io.BytesIO(sample["jpg"])) as im:  # as load_image decodes
                    im.draft("RGB", (4096, 4096))
                    im.load()
                    _to_rgb(ImageOps.exif_transpose(im), 4096)
                n += 1
            seconds = time.time() - t
            out["webdataset"] = {"version": wds.__version__, "samples": n, "seconds": round(seconds, 3),
                                 "samples_per_second": round(n / seconds, 1)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
