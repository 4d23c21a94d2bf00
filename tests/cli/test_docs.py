"""The docs cannot drift: the config and CLI references are what the code generates, every relative link and
picture resolves, and the version agrees everywhere it is written."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from typer.testing import CliRunner

from pipeline.run.configdoc import config_reference, rows
from runall import app

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def broken_links(page: Path) -> list[str]:
    """Every relative link (and picture) of ``page`` whose file, or whose #anchor in that file, does not exist."""
    bad = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and file.suffix == ".md":
            heads = {slug(h) for h in re.findall(r"(?m)^#+ (.+)$", file.read_text(encoding="utf-8"))}
            if anchor not in heads:
                bad.append(f"{page.name}: {target} (no heading #{anchor})")
    return bad


def test_config_reference_is_what_the_code_generates():
    from stages import PRESETS, RunConfig, config_choices

    expected = config_reference(RunConfig, PRESETS, config_choices())
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == expected, \
        "docs/config.md is stale: python runall.py config-reference > docs/config.md"
    made = subprocess.run([sys.executable, "runall.py", "config-reference"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    assert made == expected


def test_every_config_key_is_documented_and_a_new_one_would_show():
    from stages import RunConfig

    missing = [key for key, _, _, meaning in rows(RunConfig) if not meaning]
    assert not missing, f"config keys without a comment beside their field: {missing}"

    @dataclasses.dataclass(frozen=True)
    class Drifted(RunConfig):
        brand_new: int = 7  # a key added to the code

    assert ("brand_new", "int", "7", "a key added to the code") in rows(Drifted)
    assert all(r in rows(Drifted) for r in rows(RunConfig))


def test_cli_reference_is_what_typer_generates():
    made = subprocess.run([sys.executable, "-m", "typer", "runall.py", "utils", "docs", "--name", "python runall.py"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8").strip() == made.strip(), (
        'docs/cli.md is stale: python -m typer runall.py utils docs --name "python runall.py" --output docs/cli.md')


def test_each_layer_imports_only_the_layers_below_it():
    import ast

    above = {"pipeline": ("stages", "cli", "runall"), "stages": ("cli", "runall"), "cli": ("runall",)}
    found = []
    for layer, banned in above.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in banned]
    assert not found, found


def test_every_relative_link_and_picture_resolves():
    bad = [b for page in PAGES for b in broken_links(page)]
    assert not bad, bad
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert len(pictures) >= 3 and all((ROOT / p).is_file() and (ROOT / p).stat().st_size > 10_000 for p in pictures)


def test_the_link_check_catches_a_broken_link(tmp_path):
    (tmp_path / "there.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](there.md#a-heading) [gone](missing.md) [bad anchor](there.md#nope) ![pic](x.png) "
                    "[web](https://example.org/x)\n")
    assert broken_links(page) == ["page.md: missing.md (no such file)", "page.md: there.md#nope (no heading #nope)",
                                  "page.md: x.png (no such file)"]


def test_version_agrees_in_pyproject_cli_and_changelog():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"clipsight {version}", (r.output, version)
    newest = re.search(r"(?m)^## (\S+)", (ROOT / "CHANGELOG.md").read_text()).group(1)
    assert newest == version


def test_readme_opens_with_what_a_picture_and_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    first_screen = "\n".join(lines[:20])
    assert "shows what CLIP" in first_screen and "![" in first_screen
    assert 'pip install -e ".[dev]"' in first_screen and "python -m pytest -q" in first_screen
    assert len(lines) <= 160


def test_architecture_names_only_files_that_exist_and_every_registry_entry_is_documented():
    """ARCHITECTURE.md's tables and recipes name files; each must exist. Every stage, export format and map
    method has its module or its place in the docs, so a recipe that skips a step fails here."""
    from pipeline.labels.exports import FORMATS
    from pipeline.heatmaps import names
    from stages import STAGES

    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`((?:pipeline|stages|tests|docs)/[\w/.<>-]+\.(?:py|md|html))`", text))
    missing = [p for p in paths if "<" not in p and not (ROOT / p).exists()]
    assert paths and not missing, f"ARCHITECTURE.md names files that do not exist: {missing}"
    unnamed = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
               if p.stem != "__init__" and "/methods/" not in str(p)
               and f"`{p.name}`" not in text and f"`{p.relative_to(ROOT / 'pipeline')}`" not in text]
    assert not unnamed, f"library modules ARCHITECTURE.md does not describe: {unnamed}"
    assert all((ROOT / "stages" / f"{s}.py").exists() and (ROOT / "tests" / "stages" / f"test_{s}.py").exists()
               for s in STAGES)
    labels = (ROOT / "docs" / "auto-labels.md").read_text(encoding="utf-8").lower()
    assert all(f.lower() in labels for f in FORMATS)
    methods = (ROOT / "docs" / "heatmap-methods.md").read_text(encoding="utf-8")
    assert all(f"| `{m}` |" in methods for m in names())


def test_no_module_outgrows_450_lines():
    """A module past 450 lines is doing more than one job: split it (the toy trainer is the one exception)."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for layer in ("pipeline", "stages", "cli") for p in (ROOT / layer).rglob("*.py")}
    sizes["runall.py"] = len((ROOT / "runall.py").read_text(encoding="utf-8").splitlines())
    big = {p: n for p, n in sizes.items() if n > 450 and not p.endswith("toy/train.py")}
    assert not big, big
    assert sizes["runall.py"] <= 350
