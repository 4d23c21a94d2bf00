"""Command-line conventions: help without torch, --version, choices, stdout for results, --json, --dry-run,
presets, Ctrl-C, unwrapped long lines."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

import runall
from runall import app
from tests.conftest import fast_args

ROOT = Path(__file__).resolve().parents[2]
FAST = fast_args()


def _run(*args):
    return CliRunner().invoke(app, [*args], catch_exceptions=False)


def test_help_imports_neither_torch_nor_the_stages():
    code = ("import sys, runall\n"
            "try:\n    runall.app(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'clip', 'stages', 'pipeline.run.runner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_status_and_a_rerun_with_nothing_to_do_never_import_torch(tmp_path, images):
    """Reading a run needs no model: torch (1.5 s and 600 MiB to import) stays unloaded (pipeline.lazy)."""
    run_args = ["--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r",
                "--quiet", *FAST]
    assert _run(*run_args).exit_code == 0
    before = (tmp_path / "r" / "manifest.jsonl").read_text().count('"stage": "ascend"')
    assert before == 3  # the fixture's three images
    code = ("import sys, runall\n"
            "try:\n    runall.app(sys.argv[1:])\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
            "print('TORCH', sorted(m for m in ('torch', 'kornia', 'clip') if m in sys.modules))")
    for argv in (["status", "--run", str(tmp_path / "r"), "--json"], run_args):
        out = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True)
        lines = out.stdout.splitlines()
        assert lines[-2:] == ["EXIT 0", "TORCH []"], (argv[0], out.stdout[-1500:], out.stderr[-1500:])
    assert (tmp_path / "r" / "manifest.jsonl").read_text().count('"stage": "ascend"') == before  # nothing was redone


def test_version_bare_command_and_choices():
    r = _run("--version")
    assert r.exit_code == 0 and r.stdout.startswith("clipsight ") and r.stdout.split()[1][0].isdigit()
    r = _run()
    assert "Usage:" in r.stdout + r.stderr and "ascend" in r.stdout + r.stderr  # bare: the help
    r = _run("--help")
    assert "<auto|cpu|cuda>" in r.stdout and "<fast|classic|best>" in r.stdout
    r = _run("toy", "scenes", "--out", "x", "--style", "weird")
    assert r.exit_code == 2 and "'weird' is not one of 'train', 'alt'" in r.stderr


def test_the_stage_names_and_choices_match_the_library():
    from pipeline.toy.train import RECIPES
    from stages import PRESETS, STAGE_ORDER

    assert runall.STAGE_NAMES == STAGE_ORDER
    from cli.common import Preset
    from cli.toy import Recipe

    assert [p.value for p in Preset] == list(PRESETS)
    assert sorted(r.value for r in Recipe) == sorted(["auto", *RECIPES])


def test_results_go_to_stdout_and_json_is_parseable(tmp_path, images):
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r",
             "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    summary = json.loads(r.stdout)  # nothing but the JSON on stdout; progress and logs are on stderr
    assert summary["exit_code"] == 0 and summary["run"] == str(tmp_path / "r")
    assert [s["stage"] for s in summary["stages"]] == ["ascend", "decode", "surgery", "rank", "export", "report"]
    assert summary["stages"][0]["done"] == 3 and summary["report"] == str(tmp_path / "r" / "report.html")
    assert Path(summary["images_csv"]).is_file() and summary["failures"] == []
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r", *FAST)
    assert "report: " in r.stdout and "CLIP's most unusual words" in r.stdout  # tables and paths: stdout


def test_dry_run_lists_images_and_estimates_from_finished_work(tmp_path, images):
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r",
             "--dry-run", "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    plan = json.loads(r.stdout)
    assert sorted(plan["images"]) == sorted(p.name for p in images.iterdir()) and plan["estimate_s"] is None
    assert not (tmp_path / "r").exists()  # nothing was run or written
    assert _run("--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r",
                "--quiet", "--stages", "ascend", *FAST).exit_code == 0
    (images / "extra.png").write_bytes((images / sorted(p.name for p in images.iterdir())[0]).read_bytes())
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r",
             "--dry-run", "--json", "--stages", "ascend", *FAST)
    plan = json.loads(r.stdout)
    ascend = plan["stages"][0]
    assert ascend["todo"] == 1 and ascend["done"] == 3 and ascend["timed"] == 3  # only the new image is left
    assert plan["estimate_s"] == pytest.approx(ascend["seconds_each"], abs=0.051)  # one image to do
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r",
             "--dry-run", "--stages", "ascend", *FAST)
    assert "extra.png" in r.stdout and "from the images finished in this run" in r.stdout
    fresh = ["--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "new",
             "--dry-run", "--json", "--stages", "ascend"]
    plan = json.loads(_run(*fresh, *FAST).stdout)  # a new run beside it, with the same settings
    assert plan["stages"][0]["timed_in"] == "other runs with these settings" and plan["estimate_s"] is not None
    plan = json.loads(_run(*fresh, *fast_args(ascend__iterations=7)).stdout)  # other settings: no estimate
    assert plan["stages"][0]["timed"] == 0 and plan["estimate_s"] is None


def test_a_preset_fills_only_the_keys_nothing_else_sets(tmp_path):
    from pipeline.run.config import ConfigError, resolve_config
    from stages import PRESETS, RunConfig

    cfg = resolve_config(RunConfig, None, {}, {"preset": "fast"}, [], presets=PRESETS)
    assert (cfg.ascend.iterations, cfg.ascend.candidates) == (100, 8)
    cfg = resolve_config(RunConfig, None, {}, {"preset": "fast"}, ["ascend.iterations=7"], presets=PRESETS)
    assert (cfg.ascend.iterations, cfg.ascend.candidates) == (7, 8)  # --set wins, the preset fills the rest
    assert resolve_config(RunConfig, None, {}, {}, [], presets=PRESETS).ascend.iterations == 400  # classic
    demo = resolve_config(RunConfig, ROOT / "configs" / "demo.yaml", {}, {}, [], presets=PRESETS)
    assert demo.preset == "fast" and demo.ascend.iterations == 100  # the demo runs the fast preset
    f = tmp_path / "c.yaml"
    f.write_text("preset: quick\n")
    with pytest.raises(ConfigError, match=r"c.yaml: .*'preset' must be one of|unknown preset 'quick'"):
        resolve_config(RunConfig, f, {}, {}, [], presets=PRESETS)


def test_preset_option_reaches_the_saved_config(tmp_path, images):
    r = _run("--input", str(images), "--model", "random:tiny", "--output", str(tmp_path), "--run-name", "r",
             "--quiet", "--stages", "ascend", "--preset", "fast", "--set", "ascend.bank_size=8", "--set",
             "ascend.views=4", "--set", "ascend.iterations=3")
    assert r.exit_code == 0, r.stderr
    saved = yaml.safe_load((tmp_path / "r" / "run.yaml").read_text())
    assert saved["preset"] == "fast" and saved["ascend"]["candidates"] == 8 and saved["ascend"]["iterations"] == 3


def test_ctrl_c_says_how_to_resume_and_is_logged(tmp_path, images, monkeypatch, capsys):
    from stages import STAGES

    def interrupted(ctx, refs, loaded):
        raise KeyboardInterrupt

    monkeypatch.setattr(STAGES["decode"], "process", interrupted)
    monkeypatch.setattr(sys, "argv", ["runall.py", "--input", str(images), "--model", "random:tiny", "--output",
                                      str(tmp_path), "--run-name", "r", "--quiet", *FAST])
    with pytest.raises(SystemExit) as exit_:
        runall.run()
    assert exit_.value.code == 130
    assert "interrupted — rerun the same command to resume" in capsys.readouterr().err
    log = (tmp_path / "r" / "run.log").read_text()
    assert "interrupted" in log and "rerun the same command to resume" in log
    assert len(list((tmp_path / "r" / "ascend").glob("*.json"))) == 3  # finished work is kept


def test_long_lines_are_never_wrapped(monkeypatch, capsys):
    import cli.common

    narrow = Console(stderr=True, soft_wrap=cli.common.console.soft_wrap, width=40)
    monkeypatch.setattr(cli.common, "console", narrow)
    url = "https://openaipublic.azureedge.net/clip/models/" + "5" * 64 + "/ViT-B-16.pt"
    with pytest.raises(Exception):
        cli.common.fail(f"could not download {url} into /home/someone/.cache/clip")
    err = capsys.readouterr().err
    assert url in err.replace("\n", "") and any(url in line for line in err.splitlines())
