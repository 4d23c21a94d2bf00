import json
import subprocess
import sys

import pytest

from pipeline.run.manifest import DoneRecord
from pipeline.run.rundir import RunDir, atomic_path, atomic_write_text


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_killed_process_leaves_no_file_that_counts_as_done(tmp_path):
    run = RunDir(tmp_path / "run")
    code = f"""
import os, signal, sys
sys.path.insert(0, {str(__import__('pathlib').Path.cwd())!r})
from pathlib import Path
from pipeline.run.rundir import RunDir, atomic_path
run = RunDir(Path({str(run.root)!r}))
run.append_manifest([{{"image": "a", "stage": "ascend", "status": "done", "outputs": ["ascend/a.json"]}}])
with atomic_path(run.file("ascend", "b.json")) as tmp:
    tmp.write_text('{{"half": ')
    with open(run.file("manifest.jsonl"), "a") as f:
        f.write('{{"image": "b", "stage": "ascend", "sta')
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
"""
    (run.root / "ascend").mkdir(parents=True)
    (run.root / "ascend" / "a.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert not run.file("ascend", "b.json").exists()
    latest = run.latest()  # the torn line is skipped
    assert set(latest) == {("a", "ascend")}
    assert run.is_done(latest[("a", "ascend")])


def test_done_requires_outputs_to_exist(tmp_path):
    run = RunDir(tmp_path)
    rec = {"image": "a", "stage": "ascend", "status": "done", "outputs": ["ascend/a.json"]}
    assert not run.is_done(rec)
    atomic_write_text(run.file("ascend", "a.json"), "{}")
    assert run.is_done(rec)
    assert not run.is_done({**rec, "status": "failed"})


def test_latest_record_wins(tmp_path):
    run = RunDir(tmp_path)
    run.append_manifest([{"image": "a", "stage": "s", "status": "failed", "error": "x", "outputs": []}])
    run.append_manifest([{"image": "a", "stage": "s", "status": "done", "outputs": []}])
    assert run.latest()[("a", "s")]["status"] == "done"
    lines = run.file("manifest.jsonl").read_text().splitlines()
    assert [json.loads(x)["status"] for x in lines] == ["failed", "done"]


def test_outputs_get_the_usual_permissions(tmp_path):
    import os
    import stat

    atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~umask


def test_a_torn_line_cannot_swallow_the_next_record(tmp_path):
    run = RunDir(tmp_path)
    run.append_manifest([{"image": "a", "stage": "s", "status": "done", "outputs": []}])
    with open(run.file("manifest.jsonl"), "a") as f:
        f.write('{"image": "b", "stage": "s", "sta')  # what a kill mid-write leaves
    run.append_manifest([{"image": "c", "stage": "s", "status": "done", "outputs": []}])
    assert set(run.latest()) == {("a", "s"), ("c", "s")}


def test_rank_shards_are_read_and_merged(tmp_path):
    main, r0, r1 = RunDir(tmp_path), RunDir(tmp_path, shard=0), RunDir(tmp_path, shard=1)
    main.append_manifest([{"image": "a", "stage": "s", "status": "failed", "error": "x", "outputs": []}])
    r0.append_manifest([{"image": "a", "stage": "s", "status": "done", "outputs": []}])
    r1.append_manifest([{"image": "b", "stage": "s", "status": "done", "outputs": []}])
    assert not main.file("manifest.jsonl").read_text().count('"b"')  # each rank writes only its own file
    assert {k: v["status"] for k, v in main.latest().items()} == {("a", "s"): "done", ("b", "s"): "done"}
    main.merge_manifest_shards()
    assert not list(main.file("manifests").glob("*.jsonl"))
    assert {k: v["status"] for k, v in main.latest().items()} == {("a", "s"): "done", ("b", "s"): "done"}
    assert len(main.file("manifest.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("block", [7, 8 << 20])  # lines cut across the blocks it reads, and whole
def test_latest_read_again_sees_appends_torn_lines_and_replaced_files_as_a_fresh_read_does(tmp_path, monkeypatch,
                                                                                          block):
    """``latest`` reads a manifest once and then only what was appended: whatever happened to the file in between,
    it must agree with a ``RunDir`` that reads it from the start."""
    monkeypatch.setattr("pipeline.run.manifest.ManifestTail._BLOCK", block)
    run, path = RunDir(tmp_path), tmp_path / "manifest.jsonl"
    rec = lambda image, status: {"image": image, "stage": "s", "status": status, "outputs": []}  # noqa: E731

    def agrees() -> dict:
        got = {k: v["status"] for k, v in run.latest().items()}
        assert got == {k: v["status"] for k, v in RunDir(tmp_path).latest().items()}
        return got

    assert agrees() == {}
    run.append_manifest([rec("a", "failed")])
    assert agrees() == {("a", "s"): "failed"}
    RunDir(tmp_path).append_manifest([rec("a", "done"), rec("b", "done")])  # another process appends
    assert agrees() == {("a", "s"): "done", ("b", "s"): "done"}
    with open(path, "a") as f:  # a kill mid-append: a whole record, but no newline yet
        f.write(json.dumps(rec("c", "failed")))
    assert agrees() == {("a", "s"): "done", ("b", "s"): "done", ("c", "s"): "failed"}
    with open(path, "a") as f:  # then a torn one after it
        f.write('\n{"image": "d", "stage": "s", "sta')
    run.append_manifest([rec("c", "done")])
    assert agrees() == {("a", "s"): "done", ("b", "s"): "done", ("c", "s"): "done"}
    atomic_write_text(path, json.dumps(rec("z", "done")) + "\n")  # replaced by a shorter file
    assert agrees() == {("z", "s"): "done"}
    size = path.stat().st_size
    with open(path, "r+") as f:  # changed in place, to the same length, and then appended to
        text = f.read().replace('"z"', '"y"')
        f.seek(0)
        f.write(text)
    assert path.stat().st_size == size
    run.append_manifest([rec("x", "done")])
    assert agrees() == {("y", "s"): "done", ("x", "s"): "done"}
    path.unlink()
    assert agrees() == {}


def test_latest_keeps_every_field_of_each_record(tmp_path):
    run = RunDir(tmp_path)
    rec = {"image": "a", "path": "imgs/a.png", "stage": "surgery", "status": "done", "error": None, "seconds": 1.5,
           "outputs": ["surgery/a.json", "surgery/a.npz"], "sums": {"surgery/a.json": [3, "ab"], "surgery/a.npz": [9, "cd"]},
           "rid": "r1", "upstream": {"decode": "r0"}, "provenance": "p", "session": "s", "extra": {"x": [1]}}
    run.append_manifest([rec, {**rec, "stage": "decode", "outputs": [], "sums": {}, "upstream": {}}])
    got = run.latest()[("a", "surgery")]
    assert got == rec
    assert json.dumps(dict(got)) == json.dumps(rec)  # the same keys in the same order
    assert isinstance(got, DoneRecord)  # kept compact
    got["outputs"].append("x")
    got["sums"]["surgery/a.json"][0] = 0
    assert got == rec  # what a reader changes is not kept


@pytest.mark.parametrize("change", [{"status": "failed", "error": "why"}, {"sums": {"surgery/a.json": [3, "ab"]}},
                                    {"sums": {"surgery/a.json": [3, "xyz"], "surgery/a.npz": [9, "cd"]}},
                                    {"image": None}, {"upstream": {"decode": 7}}, {"outputs": ["surgery/a\0.json"]},
                                    {"stage": 5}])
def test_a_record_of_another_shape_is_kept_as_it_was_read(tmp_path, change):
    rec = {"image": "a", "path": "p", "stage": "surgery", "status": "done", "error": None, "outputs": ["surgery/a.json",
           "surgery/a.npz"], "sums": {"surgery/a.json": [3, "ab"], "surgery/a.npz": [9, "cd"]}, "rid": "r1", **change}
    run = RunDir(tmp_path)
    run.append_manifest([rec])
    got = run.latest()[(rec["image"], rec["stage"])]
    assert not isinstance(got, DoneRecord) and got == rec


def test_damage_reads_the_same_from_a_compact_record(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.json").write_text("{}")
    rec = {"image": "a", "path": "p", "stage": "decode", "status": "done", "error": None, "outputs": ["labels/a.json"],
           "sums": run.output_sums(["labels/a.json"]), "rid": "r1"}
    run.append_manifest([rec])
    got = run.latest()[("a", "decode")]
    assert isinstance(got, DoneRecord) and run.damage(got) is None and run.damage(got, hashes=True) is None
    (tmp_path / "labels" / "a.json").write_text("[]")  # same size, other bytes
    assert run.damage(got) is None and "checksum mismatch" in run.damage(got, hashes=True)
    (tmp_path / "labels" / "a.json").write_text("{ }")
    assert run.damage(got) == run.damage(rec) == "labels/a.json: 3 bytes, 2 when written"
    (tmp_path / "labels" / "a.json").unlink()
    assert run.damage(got) == run.damage(rec) == "labels/a.json: missing"
