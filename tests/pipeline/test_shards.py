"""pipeline.run.shards: webdataset tar shards as input, each sample an image of the run."""

import io
import json
import tarfile

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.run.images import ImageError, InputError, discover_images, load_image
from pipeline.run.shards import caption, expand_braces, split_sample
from pipeline.toy.world import write_scenes
from runall import app
from stages.report import load_report
from tests.conftest import fast_args


def _shard(path, samples):
    """A tar of ``{key: {ext: bytes}}``, members in the order given, as webdataset writes them."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(colour):
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_brace_patterns_expand_as_shell_and_webdataset_write_them():
    assert expand_braces("s/{00008..00011}.tar") == ["s/00008.tar", "s/00009.tar", "s/00010.tar", "s/00011.tar"]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_samples_are_images_with_their_metadata_and_a_broken_shard_is_one_failing_input(tmp_path):
    _shard(tmp_path / "000.tar", {"a": {"jpg": _png((255, 0, 0)), "txt": b"a red thing", "json": b'{"url": "u"}'},
                                  "sub/b.c": {"png": _png((0, 0, 255)), "json": b'{"caption": "blue"}'},
                                  "nopic": {"txt": b"no image here"}})
    (tmp_path / "001.tar").write_bytes(b"this is not a tar file at all" * 30)
    refs = discover_images(tmp_path / "{000..002}.tar")  # 002 does not exist: an input that fails, the others read
    assert [r.rel for r in refs] == ["000.tar/a.jpg", "000.tar/sub/b.c.png", "001.tar", "002.tar"]
    assert caption(json.loads(refs[0].meta)) == "a red thing" and caption(json.loads(refs[1].meta)) == "blue"
    assert load_image(refs[0].path).getpixel((3, 3)) == (255, 0, 0)
    assert load_image(refs[1].path).size == (24, 16)
    with pytest.raises(ImageError, match="the shard cannot be read: not a readable tar shard"):
        load_image(refs[2].path)
    with pytest.raises(ImageError, match="the shard cannot be read: no such shard"):
        load_image(refs[3].path)
    assert [r.id for r in discover_images(tmp_path)] == [r.id for r in refs[:3]]  # a folder of shards: the same ids
    with pytest.raises(InputError, match="no shard of"):
        discover_images(tmp_path / "{005..006}.tar")


def test_a_sample_cut_short_fails_with_its_reason(tmp_path):
    _shard(tmp_path / "s.tar", {"a": {"png": _png((0, 255, 0))}, "b": {"png": _png((9, 9, 9)) * 40}})
    refs = discover_images(tmp_path / "s.tar")
    data = (tmp_path / "s.tar").read_bytes()
    offset = split_sample(refs[1].path)[1]
    (tmp_path / "s.tar").write_bytes(data[: offset + 10])  # the shard lost its end after the run listed it
    assert load_image(refs[0].path).getpixel((0, 0)) == (0, 255, 0)
    with pytest.raises(ImageError, match="its shard is cut short"):
        load_image(refs[1].path)


def test_a_run_over_shards_labels_each_sample_keeps_captions_and_resumes(tmp_path):
    scenes = tmp_path / "scenes"
    write_scenes(scenes, seed=12, count=3)
    pngs = sorted(scenes.glob("*.png"))
    (tmp_path / "shards").mkdir()
    _shard(tmp_path / "shards" / "00000.tar", {f"s{k}": {"png": p.read_bytes(), "txt": f"scene {k}".encode()} for k, p in enumerate(pngs[:2])})
    _shard(tmp_path / "shards" / "00001.tar", {"s2": {"png": pngs[2].read_bytes()}})
    args = ["--input", str(tmp_path / "shards" / "{00000..00001}.tar"), "--model", "random:tiny", "--output",
            str(tmp_path / "out"), "--run-name", "r", "--quiet", *fast_args()]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "r"
    rows = (run / "images.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[1].startswith("00000.tar/s0.png,") and rows[1].endswith(",scene 0")
    assert all(",done," in row for row in rows[1:])
    assert [c["caption"] for c in load_report(run / "report.html")["cards"]] == ["scene 0", "scene 1", ""]  # on its card
    n = len((run / "manifest.jsonl").read_text().splitlines())
    assert CliRunner().invoke(app, args, catch_exceptions=False).exit_code == 0
    new = [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()[n:]]
    assert {x["stage"] for x in new} == {"rank", "export", "report"}  # every sample was done: nothing redone


def test_under_torchrun_a_shards_samples_go_to_one_rank_and_plain_images_interleave_as_before():
    from pipeline.run.distributed import DistInfo

    items = ["a.tar::1", "a.tar::2", "b.tar::1", "x.png", "a.tar::3", "y.png"]
    group = lambda s: s.split("::")[0]  # noqa: E731
    ranks = [DistInfo(rank=r, world_size=2).shard(items, group=group) for r in range(2)]
    assert ranks == [["a.tar::1", "a.tar::2", "x.png", "a.tar::3"], ["b.tar::1", "y.png"]]
    plain = ["p0", "p1", "p2", "p3", "p4"]
    assert [DistInfo(rank=r, world_size=2).shard(plain, group=lambda s: s) for r in range(2)] == \
        [DistInfo(rank=r, world_size=2).shard(plain) for r in range(2)]
