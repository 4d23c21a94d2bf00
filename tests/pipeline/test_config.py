import pytest

from pipeline.run.config import ConfigError, build_config, load_yaml, parse_overrides, resolve_config
from stages import RunConfig


def test_unknown_key_names_key_file_and_valid_keys(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: toy\nascend:\n  iterationz: 3\n")
    with pytest.raises(ConfigError) as e:
        resolve_config(RunConfig, f, {}, {}, [])
    msg = str(e.value)
    assert "ascend.iterationz" in msg and str(f) in msg and "iterations" in msg


def test_unknown_top_level_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("modle: toy\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*model"):
        resolve_config(RunConfig, f, {}, {}, [])


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
        resolve_config(RunConfig, f, {}, {}, [])


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: toy\nseed: 5\nascend:\n  iterations: 7\n")
    cfg = resolve_config(RunConfig, f, {}, {"model": "random:tiny"}, ["ascend.iterations=9"])
    assert cfg.model == "random:tiny"  # CLI beats YAML
    assert cfg.seed == 5  # YAML beats default
    assert cfg.ascend.iterations == 9  # --set beats YAML
    assert cfg.ascend.candidates == 16  # default kept


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["ascend.iterations"])


@pytest.mark.parametrize("name", ["default", "demo", "overnight"])
def test_shipped_configs_are_valid_and_say_what_they_set(name):
    """Every key a shipped config sets reaches the built config, and each keeps the original's ascent settings."""
    from pathlib import Path

    from pipeline.run.config import to_dict

    data = load_yaml(Path(__file__).parents[2] / "configs" / f"{name}.yaml")
    built = to_dict(build_config(RunConfig, data, name))

    def check(section: dict, got: dict, path: str) -> int:
        n = 0
        for key, value in section.items():
            if isinstance(value, dict):
                n += check(value, got[key], f"{path}{key}.")
            else:
                assert got[key] == (list(value) if isinstance(value, tuple) else value), f"{name}: {path}{key}"
                n += 1
        return n

    assert check(data, built, "") >= 1  # the file sets something, and all of it arrives
    assert built["ascend"]["iterations"] == 400 and built["ascend"]["candidates"] == 16 and built["ascend"]["tokens"] == 5
