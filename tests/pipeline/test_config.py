import pytest

from pipeline.config import ConfigError, build_config, load_yaml, parse_overrides
from runall import resolve_config
from stages import RunConfig


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: toy\nascend:\n  iterationz: 3\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(f, {}, {}, [])
    msg = str(e.value)
    assert "ascend.iterationz" in msg and str(f) in msg and "iterations" in msg


def test_unknown_top_level_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("modle: toy\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*model"):
        resolve_config(f, {}, {}, [])


@pytest.mark.parametrize("text, match", [
    ("seed: three\n", "'seed' must be an integer"),
    ("device: gpu\n", "'device' must be one of"),
    ("ascend:\n  lr: yes\n", "'ascend.lr' must be a number"),
    ("ascend:\n  iterations: 0\n", "iterations must be >= 1"),
    ("ascend: 5\n", "'ascend' must be a mapping"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_wrong_types_and_values(tmp_path, text, match):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        resolve_config(f, {}, {}, [])


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: toy\nseed: 5\nascend:\n  iterations: 7\n")
    cfg = resolve_config(f, {}, {"model": "random:tiny"}, ["ascend.iterations=9"])
    assert cfg.model == "random:tiny"  # CLI beats YAML
    assert cfg.seed == 5  # YAML beats default
    assert cfg.ascend.iterations == 9  # --set beats YAML
    assert cfg.ascend.candidates == 16  # default kept


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["ascend.iterations"])


@pytest.mark.parametrize("name", ["default", "demo", "overnight"])
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    cfg = build_config(RunConfig, load_yaml(Path("configs") / f"{name}.yaml"), name)
    assert cfg.ascend.iterations == 400 and cfg.ascend.candidates == 16 and cfg.ascend.tokens == 5
