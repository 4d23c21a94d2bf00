"""Hostile inputs through the whole CLI: the run never crashes, and every file is either processed or failed with a reason."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from runall import app
from tests.conftest import fast_args

FAST = fast_args(ascend__iterations=4, ascend__candidates=2, ascend__bank_size=4, ascend__views=2,
                 surgery__single_resolution=32, surgery__max_labels=2)


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def hostile(tmp_path):
    d = tmp_path / "in put"
    d.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    good = _png(rgb)
    (d / "plain.png").write_bytes(good)
    (d / "duplicate.png").write_bytes(good)
    (d / "ünïcødé name ☃.png").write_bytes(good)
    (d / "tiny 1x1.png").write_bytes(_png(Image.new("RGB", (1, 1), (200, 10, 10))))
    rgb.convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)).save(d / "sixteen.png")
    rgb.convert("P").save(d / "palette.gif")
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(d / "alpha.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rgb.save(d / "rotated.jpg", exif=exif)
    Image.new("RGB", (12000, 12000), (30, 60, 90)).save(d / "huge.jpg", quality=50)
    (d / "sub").mkdir()
    os.symlink(d / "plain.png", d / "sub" / "link to plain.png")
    bad = {
        "empty.png": ("", "empty"),
        "text.jpg": ("this is not a picture", "not an image"),
        "truncated.png": (good[: len(good) // 2], "truncated"),
        "truncated.jpg": (None, "truncated"),
        "bomb.png": (None, "too large"),
        "loop.png": (None, "cannot read"),
        "dangling.png": (None, "cannot read"),
    }
    for name, (content, _) in bad.items():
        if content is not None:
            (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    jpg = io.BytesIO()
    rgb.save(jpg, format="JPEG")
    (d / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    Image.new("L", (13000, 13000)).save(d / "bomb.png")
    os.symlink(d / "loop.png", d / "loop.png")
    os.symlink(d / "missing-target.png", d / "dangling.png")
    if os.geteuid() != 0:  # root reads everything, so this case exists only for other users
        (d / "unreadable.png").write_bytes(good)
        (d / "unreadable.png").chmod(0)
        bad["unreadable.png"] = (None, "cannot read")
    names_ok = ["plain.png", "duplicate.png", "ünïcødé name ☃.png", "tiny 1x1.png", "cmyk.jpg", "sixteen.png",
                "palette.gif", "alpha.png", "animated.gif", "rotated.jpg", "huge.jpg", "sub/link to plain.png"]
    return d, names_ok, {k: v[1] for k, v in bad.items()}


def test_hostile_folder(tmp_path, hostile):
    d, names_ok, reasons = hostile
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*")}
    r = CliRunner().invoke(app, ["--input", str(d), "--model", "random:tiny", "--output", str(out), "--run-name", "r",
                                 "--quiet", *FAST], catch_exceptions=False)
    assert r.exit_code == 1, r.output  # some files failed; the run finished
    run = out / "r"
    images = {json.loads(x)["rel"]: json.loads(x)["id"] for x in (run / "images.jsonl").read_text().splitlines()}
    assert set(images) == set(names_ok) | set(reasons)
    latest = {}
    for line in (run / "manifest.jsonl").read_text().splitlines():
        rec = json.loads(line)
        latest[(rec["image"], rec["stage"])] = rec
    for name in names_ok:
        for stage in ("ascend", "decode", "surgery"):
            rec = latest[(images[name], stage)]
            assert rec["status"] == "done", (name, stage, rec["error"])
    for name, reason in reasons.items():
        rec = latest[(images[name], "ascend")]
        assert rec["status"] == "failed" and reason in rec["error"] and name in rec["error"], (name, rec["error"])
        blocked = latest[(images[name], "decode")]  # blocked with its reason, not attempted
        assert blocked["status"] == "blocked" and blocked["error"] == rec["error"] and not blocked["outputs"]
        assert blocked["cause"] == "ascend" and blocked["advice"] == rec["advice"] == "replace or remove the file"
    meta = json.loads((run / "surgery" / f"{images['rotated.jpg']}.json").read_text())
    assert meta["size"] == [40, 50]  # EXIF rotation applied: 50x40 stored, 40x50 shown
    meta = json.loads((run / "surgery" / f"{images['huge.jpg']}.json").read_text())
    assert max(meta["size"]) <= 4096  # downscaled on load
    written = {p for p in tmp_path.rglob("*")} - before
    assert written and all(p == out or p.is_relative_to(run) for p in written)  # nothing was written outside the run
    assert "bomb.png" in (run / "report.html").read_text()
