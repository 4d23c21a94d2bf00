"""What a person reads after a run: tokens cut inside a character, and failures, in plain words."""

import json

from typer.testing import CliRunner

import stages.ascend
from pipeline.model.tokens import vocab
from pipeline.toy.world import write_scenes
from runall import app
from stages.report import load_report
from tests.conftest import fast_args

TEXT_SUFFIXES = {".json", ".jsonl", ".csv", ".md", ".txt", ".html", ".yaml", ".log"}


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_no_replacement_character_in_any_file_of_a_run_whose_opinions_hold_byte_tokens(tmp_path, monkeypatch):
    v = vocab()
    e = v.tokenizer.encoder
    # Only pieces of multi-byte characters (the three of "✓", a lone lead byte) and two words: every candidate
    # holds bytes, some that join into a character and some that cannot.
    pieces = ["â", "ľ", "ĵ</w>", "â</w>", "Ĳ", "ring</w>", "red</w>"]
    monkeypatch.setattr(stages.ascend, "allowed_token_ids", lambda *a, **k: tuple(e[p] for p in pieces))
    write_scenes(tmp_path / "imgs", seed=3, count=2)
    r = _run("--input", tmp_path / "imgs", "--model", "toy", "--output", tmp_path / "out", "--run-name", "r",
             "--quiet", *fast_args(**{"ascend.discover": "whole"}))
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "r"
    opinions = [json.loads(p.read_text()) for p in (run / "ascend").glob("*.json")]
    texts = " ".join(c["text"] for op in opinions for c in op["candidates"])
    assert "<0xe2>" in texts or "<0xc4>" in texts  # bytes that form no character are shown as bytes
    assert any("<0x" in w for op in opinions for w in op["words"])  # and they stay words, as CLIP made them
    written = [p for p in run.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    assert {p.name for p in written} >= {"records.csv", "images.csv", "report.html", "manifest.jsonl"}
    for path in written:
        assert "\ufffd".encode() not in path.read_bytes(), path
    assert "\ufffd" not in r.output


def test_a_run_over_bad_files_prints_one_plain_line_for_each(tmp_path):
    folder = tmp_path / "imgs"
    write_scenes(folder, seed=4, count=1)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not a picture\n")
    r = _run("--input", folder, "--model", "random:tiny", "--output", tmp_path / "out", "--run-name", "r",
             *fast_args())
    assert r.exit_code == 1, r.output  # some files failed; the good one finished
    lines = [" ".join(line.split()) for line in r.output.splitlines()]
    failed = [line for line in lines if line.startswith("failed ")]
    assert failed == [
        "failed empty.jpg: file is empty (0 bytes) (ascend; later stages skipped): replace or remove the file",
        "failed notes.png: not an image, or a format that cannot be decoded (ascend; later stages skipped): "
        "replace or remove the file",
    ]
    assert not any(word in r.output for word in ("is failed", "is blocked", "rerun ascend"))
    run = tmp_path / "out" / "r"
    status = _run("status", "--run", run)
    shown = [" ".join(line.split()) for line in status.output.splitlines() if line.startswith("failed ")]
    assert shown == failed  # the same words in status
    rows = {row.split(",")[0]: row for row in (run / "images.csv").read_text().splitlines()[1:]}
    assert failed[0].removeprefix("failed ") in rows["empty.jpg"] and ",done," in rows["scene_0000.png"]
    report = load_report(run / "report.html")
    assert [f["error"] for f in report["failures"]] == [line.removeprefix("failed ") for line in failed]
