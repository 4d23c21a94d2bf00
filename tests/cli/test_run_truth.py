"""A run directory that stays true: each test is one reproduction of a way the run could be made to lie."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from pipeline.run.rundir import RunDir
from stages.report import load_report
from runall import app
from tests.conftest import fast_args

ROOT = Path(__file__).resolve().parents[2]  # the repository
TINY = ["--model", "random:tiny", "--quiet", *fast_args(decode__min_frequency=1, surgery__surgery_depth=1)]


def _run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _manifest(run):
    return [json.loads(x) for x in (run / "manifest.jsonl").read_text().splitlines()]


def _report_data(run):
    return load_report(run / "report.html")


@pytest.fixture
def run(tmp_path, images):
    r = _run("--input", images, "--output", tmp_path / "out", "--run-name", "r", *TINY)
    assert r.exit_code == 0, r.output
    return tmp_path / "out" / "r"


def test_a_stage_command_redoes_what_its_settings_change_and_run_yaml_stays_true(tmp_path, images, run):
    ascend_records = sum(x["stage"] == "ascend" for x in _manifest(run))
    r = _run("surgery", "--run", run, "--quiet", "--set", "surgery.surgery_depth=2")
    assert r.exit_code == 0, r.output
    docs = [json.loads(p.read_text()) for p in (run / "surgery").glob("*.json")]
    assert len(docs) == 3 and all(d["surgery_depth"] == 2 for d in docs)  # redone, not skipped
    assert yaml.safe_load((run / "run.yaml").read_text())["surgery"]["surgery_depth"] == 2
    assert sum(x["stage"] == "ascend" for x in _manifest(run)) == ascend_records  # never ascend

    r = _run("report", "--run", run, "--quiet", "--model", "ViT-B/16")
    assert r.exit_code == 0, r.output
    assert yaml.safe_load((run / "run.yaml").read_text())["model"] == "random:tiny"  # the report made nothing with it
    assert _report_data(run)["model"] == "random:tiny"

    r = _run("--input", images, "--output", tmp_path / "out", "--run-name", "r", *TINY)  # the first command again
    assert r.exit_code == 0, r.output
    assert all(json.loads(p.read_text())["surgery_depth"] == 1 for p in (run / "surgery").glob("*.json"))


def test_redoing_decode_makes_the_later_stages_stale_until_they_are_redone(tmp_path, images, run):
    before = {p.stem: json.loads(p.read_text()) for p in (run / "labels").glob("*.json")}
    r = _run("decode", "--run", run, "--quiet", "--set", "decode.min_share=0.5", "--force")
    assert r.exit_code == 0, r.output
    after = {p.stem: json.loads(p.read_text()) for p in (run / "labels").glob("*.json")}
    assert sum(len(d["labels"]) for d in after.values()) < sum(len(d["labels"]) for d in before.values())
    r = _run("status", "--run", run)
    assert r.exit_code == 0 and "surgery stale" in r.output and "decode output(s) since redone" in r.output, r.output

    r = _run("report", "--run", run, "--quiet")
    assert r.exit_code == 0, r.output
    data = _report_data(run)
    assert all(c["maps"] == [] for c in data["cards"])  # no heatmap of a label that no longer exists
    assert sum("stale" in f["error"] and f["stage"] == "surgery" for f in data["failures"]) == 3

    r = _run("--input", images, "--output", tmp_path / "out", "--run-name", "r", *TINY, "--set", "decode.min_share=0.5")
    assert r.exit_code == 0, r.output
    for image_id, labels in after.items():
        heat = json.loads((run / "surgery" / f"{image_id}.json").read_text())
        assert [d["word"] for d in heat["labels"]] == [d["word"] for d in labels["labels"]]


def test_a_failed_start_leaves_nothing_behind_and_locks_nothing(tmp_path, images):
    out = tmp_path / "out"
    r = _run("--input", images, "--output", out, "--run-name", "r", "--quiet", "--model", tmp_path / "missing.pt")
    assert r.exit_code == 2 and "missing.pt" in r.output
    assert not (out / "r").exists()
    r = _run("--input", images, "--output", out, "--run-name", "r", *TINY, "--set", f"surgery.sam.checkpoint={tmp_path / 'sam.pth'}")
    assert r.exit_code == 2 and "sam.pth" in r.output
    assert not (out / "r").exists()
    r = _run("--input", images, "--output", out, "--run-name", "r", *TINY)
    assert r.exit_code == 0, r.output


def test_runs_resolve_their_images_from_anywhere_and_the_report_travels(tmp_path, images, monkeypatch):
    monkeypatch.chdir(images.parent)
    r = _run("--input", "imgs", "--output", "out", "--run-name", "r", *TINY)  # relative paths
    assert r.exit_code == 0, r.output
    run = tmp_path / "out" / "r"
    entries = [json.loads(x) for x in (run / "images.jsonl").read_text().splitlines()]
    assert all(os.path.isabs(e["path"]) and e["root"] == str(images) for e in entries)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = _run("surgery", "--run", run, "--quiet", "--force")
    assert r.exit_code == 0, r.output
    assert all(x["status"] == "done" for x in _manifest(run) if x["stage"] == "surgery")
    copy = tmp_path / "copied"
    shutil.copytree(run, copy)
    shutil.rmtree(images)  # the originals are gone; the copied report still shows every image
    for card in _report_data(copy)["cards"]:
        assert not card["src"].startswith("..") and (copy / card["src"]).is_file()


def test_one_writer_at_a_time_and_a_killed_holder_frees_the_run(tmp_path, images, run):
    with RunDir(run).lock():
        r = _run("--input", images, "--output", tmp_path / "out", "--run-name", "r", *TINY)
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and f"in use by pid {os.getpid()} on " in said, said
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from pipeline.run.rundir import RunDir\n"
                               f"with RunDir(Path({str(run)!r})).lock():\n print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = _run("report", "--run", run, "--quiet")
        assert r.exit_code == 2 and f"pid {holder.pid}" in " ".join(r.output.split())
        holder.kill()  # SIGKILL: the kernel drops the lock
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
    r = _run("report", "--run", run, "--quiet")
    assert r.exit_code == 0, r.output


def test_config_errors_name_their_source_and_accept_scientific_numbers(tmp_path, images):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ascend:\n  pez_lr: 1e-2\n")
    r = _run("--input", images, "--output", tmp_path / "out", "--config", cfg, *TINY, "--set", "ascend.lr=1e-2",
             "--stages", "ascend")
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "out" / "imgs" / "run.yaml").read_text())
    assert saved["ascend"]["lr"] == 0.01 and saved["ascend"]["pez_lr"] == 0.01
    r = _run("--input", images, "--output", tmp_path / "out", "--config", cfg, "--set", "ascend.lr=fast")
    assert r.exit_code == 2 and "--set ascend.lr:" in r.output and str(cfg) not in r.output, r.output
    r = _run("--input", images, "--output", tmp_path / "out", "--config", cfg, "--device", "gpu")
    assert r.exit_code == 2 and "'--device'" in r.output and "'auto', 'cpu', 'cuda'" in r.output, r.output  # a choice
    cfg.write_text("device: gpu\n")
    r = _run("--input", images, "--output", tmp_path / "out", "--config", cfg)
    assert r.exit_code == 2 and f"{cfg}: 'device' must be one of" in r.output, r.output


def test_blocked_images_say_why_and_a_run_that_did_nothing_exits_1(tmp_path, images):
    r = _run("--input", images, "--output", tmp_path / "out", "--run-name", "r", *TINY, "--stages", "decode,surgery")
    assert r.exit_code == 1, r.output
    blocked = [x for x in _manifest(tmp_path / "out" / "r") if x["status"] == "blocked"]
    assert len(blocked) == 6
    assert all(x["error"].endswith(": no ascend output") and x["cause"] == "ascend" and x["advice"] == "run ascend first"
               for x in blocked)  # surgery's reason is the start of the chain, decode's words, not nested in them
    printed = " ".join(r.output.split())
    assert "no ascend output (ascend; later stages skipped): run ascend first" in printed
    assert printed.count("no ascend output") == 3  # one line per image
