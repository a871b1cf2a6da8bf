from pathlib import Path

import pytest

from pipeline import config
from pipeline.cli import main
from pipeline.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_tiny_yaml_is_the_embedded_default():
    assert config.load(REPO / "configs" / "tiny.yaml") == config.load()


@pytest.mark.parametrize(
    "override, names",
    [
        ("data.resolutoin=32", ["data.resolutoin", "did you mean 'data.resolution'"]),
        ("dta.resolution=32", ["dta", "did you mean 'data'"]),
        ("data.resolution=abc", ["data.resolution", "expected an integer"]),
        ("data.resolution=true", ["data.resolution", "expected an integer"]),
        ("data.val_fraction=1.5", ["data.val_fraction", "[0, 1)"]),
        ("data.source=folder", ["data.path", "needs a path"]),
        ("data.path=/x", ["data.path", "built in"]),
        ("data.resize=crop", ["data.resize", "not one of"]),
        ("data.background=[1,2]", ["data.background", "expected 3 values"]),
        ("data.background=[0,0,300]", ["data.background", "[0, 255]"]),
        ("data", ["section.key=value"]),
        ("data.resolution.x=1", ["data.resolution"]),
    ],
)
def test_bad_config_names_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[override])
    for name in names:
        assert name in str(err.value)


def test_override_values_are_parsed_as_yaml_and_typed():
    cfg = config.load(overrides=["data.background=[0, 0, 0]", "data.limit=100", "data.val_fraction=0",
                                 "experiment.name=exp1"])
    assert cfg.data.background == (0, 0, 0)
    assert cfg.data.limit == 100
    assert isinstance(cfg.data.val_fraction, float)
    assert cfg.run_dir == Path("runs/exp1")
    assert config.load(overrides=["data.limit=null"]).data.limit is None


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(overrides=["data.resolution=16", "data.source=digits", "data.background=[1, 2, 3]"])
    saved = tmp_path / "config.yaml"
    saved.write_text(config.to_yaml(cfg))
    assert config.load(saved) == cfg


def test_configs_are_frozen():
    cfg = config.load()
    with pytest.raises(AttributeError):
        cfg.data.resolution = 8  # type: ignore[misc]


def test_section_hash_covers_only_named_sections():
    base = config.load()
    renamed = config.load(overrides=["experiment.name=other"])
    resized = config.load(overrides=["data.resolution=16"])
    assert config.section_hash(base, ["data"]) == config.section_hash(renamed, ["data"])
    assert config.section_hash(base, ["data"]) != config.section_hash(resized, ["data"])


def test_every_option_is_documented():
    rows = config.describe()
    assert rows and all(doc for _, doc, _ in rows)


def test_cli_rejects_bad_key_with_exit_code_and_message(capsys):
    assert main(["config", "show", "data.resolutoin=3"]) == 2
    assert "did you mean 'data.resolution'" in capsys.readouterr().err


def test_cli_config_show_prints_resolved_yaml(capsys, tmp_path):
    assert main(["config", "show", "data.resolution=16"]) == 0
    out = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(out)
    assert config.load(tmp_path / "c.yaml").data.resolution == 16


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.yaml")


def test_exponent_notation_without_a_dot_is_a_number():
    # PyYAML (YAML 1.1) reads 1e-3 as a string; users write it anyway
    assert config.load(overrides=["diffusion.learning_rate=1e-3"]).diffusion.learning_rate == 1e-3
    with pytest.raises(config.ConfigError, match="expected a number"):
        config.load(overrides=["diffusion.learning_rate=fast"])
