import builtins
import dataclasses
import io
import json
import os
import types
import typing
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline import config
from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.networks import DiTConfig, UNetConfig

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
        ("diffusion.dit=5", ["diffusion.dit", "expected a mapping of DiTOptions fields"]),
        ("experiment.name=a/b", ["experiment.name", "directory name"]),
        ("sample.eta=0.5", ["sample.eta", "takes no eta"]),
    ],
)
def test_bad_config_names_the_key(override, names):
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[override])
    for name in names:
        assert name in str(err.value)


def test_override_values_are_parsed_as_yaml_and_typed():
    cfg = config.load(
        overrides=["data.background=[0, 0, 0]", "data.limit=100", "data.val_fraction=0", "experiment.name=exp1"]
    )
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


# --------------------------------------------------------------------------- declared constraints


def _sections(cls=config.Config, prefix=""):
    """(dotted prefix, section class) for every section, nested ones included."""
    yield prefix, cls
    for f in dataclasses.fields(cls):
        if isinstance(f.default, config.Section):
            yield from _sections(type(f.default), f"{prefix}{f.name}.")


def _scalar_type(annotation):
    """The annotation less Optional and less the tuple around list fields."""
    args = [a for a in typing.get_args(annotation) if a is not type(None) and a is not Ellipsis]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, tuple):
        return _scalar_type(args[0])
    return annotation


def _violation(kind, bound, annotation, default):
    """A value of the field's type that breaks exactly the constraint ``kind``."""
    scalar = _scalar_type(annotation)
    if kind == "length":
        fewest, most = bound
        filler = default[0] if default else 1
        return [filler] * (fewest - 1 if fewest > 0 else most + 1)
    if kind in ("choices", "literal"):
        bad = "no_such_choice" if all(isinstance(c, str) for c in bound) else max(bound) + 1
    else:
        bad = scalar({"min": bound - 1, "max": bound + 1, "above": bound, "below": bound}[kind])
    if typing.get_origin(annotation) is tuple or tuple in map(typing.get_origin, typing.get_args(annotation)):
        return [bad, *default[1:]] if default else [bad]
    return bad


MESSAGES = {
    "min": "must be",
    "max": "must be",
    "above": "must be",
    "below": "must be",
    "choices": "is not one of",
    "literal": "is not one of",
    "length": "values",
}


def _constraint_cases():
    """Every declared constraint of every real field (and every Literal annotation), with a
    value that breaks it: a field added with a constraint is tested without touching this file."""
    for prefix, cls in _sections():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            declared = dict(f.metadata.get("constraints", {}))
            literal = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if typing.get_origin(a) is Literal]
            if literal:
                declared["literal"] = typing.get_args(literal[0])
            for kind, bound in declared.items():
                value = _violation(kind, bound, hints[f.name], f.default)
                yield pytest.param(cls, f.name, f"{prefix}{f.name}", kind, value, id=f"{prefix}{f.name}-{kind}")


CASES = list(_constraint_cases())


def test_every_constraint_kind_is_declared_somewhere():
    assert {case.values[3] for case in CASES} == {*config.CONSTRAINTS, "literal"}


@pytest.mark.parametrize("cls, name, key, kind, value", CASES)
def test_each_declared_constraint_is_enforced_on_load_and_names_the_key(cls, name, key, kind, value):
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[f"{key}={json.dumps(value)}"])
    assert err.value.key in (key, f"{key}[0]") and MESSAGES[kind] in err.value.reason


@pytest.mark.parametrize("cls, name, key, kind, value", CASES)
def test_each_declared_constraint_is_enforced_when_built_in_code(cls, name, key, kind, value):
    with pytest.raises(ConfigError) as err:
        cls(**{name: value})
    assert err.value.key in (name, f"{name}[0]") and MESSAGES[kind] in err.value.reason


def test_construction_in_code_checks_types_combinations_and_canonicalises():
    with pytest.raises(ConfigError, match="resolution: expected an integer"):
        config.DataConfig(resolution="32")
    with pytest.raises(ConfigError, match="path: source=folder needs a path"):
        config.DataConfig(source="folder")
    with pytest.raises(ConfigError, match="sigma_min: need sigma_min < sigma_max"):
        config.DiffusionConfig(sigma_min=2.0, sigma_max=1.0)
    with pytest.raises(ConfigError, match="diffusion: expected a DiffusionConfig"):
        config.Config(diffusion={"backbone": "dit"})
    data = config.DataConfig(background=[0, 0, 0], val_fraction=0)
    assert data.background == (0, 0, 0) and isinstance(data.val_fraction, float)
    assert data == config.load(overrides=["data.background=[0,0,0]", "data.val_fraction=0"]).data


@pytest.mark.parametrize(
    "override, key, message",
    [
        ("diffusion.dit.num_heads=5", "diffusion.dit", "num_heads 5 does not divide width 192"),
        ("diffusion.dit.width=190", "diffusion.dit", "num_heads 3 does not divide width 190"),
        (
            "diffusion.unet.model_channels=48",
            "diffusion.unet.norm_groups",
            "32 must divide every level's width [48, 96]",
        ),
    ],
)
def test_backbone_combinations_the_network_refuses_are_config_errors(override, key, message):
    """The library's rules that hold for any latent shape are checked on load, for either backbone."""
    with pytest.raises(ConfigError) as err:
        config.load(overrides=[override])
    assert (err.value.key, err.value.reason) == (key, message)


def test_latent_dependent_network_rules_wait_for_the_latents():
    """data.resolution=12 makes 3x3 latents, which the default U-Net cannot halve: fine for the
    stages before diffusion; the diffusion stage's network_config names the key and the shape."""
    cfg = config.load(overrides=["data.resolution=12"])
    with pytest.raises(ConfigError, match=r"^diffusion\.unet: input_size 3 cannot be halved.*latents are 4x3x3"):
        cfg.diffusion.network_config(channels=4, resolution=3, num_classes=0)
    dit = config.load(overrides=["diffusion.backbone=dit", "diffusion.dit.patch_size=8"]).diffusion
    with pytest.raises(ConfigError, match=r"^diffusion\.dit: patch_size 8 does not divide input_size 12"):
        dit.network_config(channels=4, resolution=12, num_classes=10)


@pytest.mark.parametrize("backbone", ["dit", "unet"])
@pytest.mark.parametrize("derived", sorted(config.DERIVED_NETWORK_KEYS))
def test_values_the_pipeline_derives_cannot_be_set(backbone, derived):
    with pytest.raises(ConfigError, match=rf"^diffusion\.{backbone}\.{derived}: is derived from"):
        config.load(overrides=[f"diffusion.{backbone}.{derived}=8"])


@pytest.mark.parametrize("options, library", [(config.DiTOptions, DiTConfig), (config.UNetOptions, UNetConfig)])
def test_backbone_options_are_the_library_config_less_the_derived_fields(options, library):
    def types_of(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls)}

    ours, theirs = types_of(options), types_of(library)
    assert set(ours) | set(config.DERIVED_NETWORK_KEYS) == set(theirs)
    assert all(ours[name] == theirs[name] for name in ours)
    library(**dataclasses.asdict(options()))  # our defaults are valid library options


def test_network_config_takes_the_derived_values_from_the_latents():
    d = config.load(overrides=["diffusion.backbone=dit", "diffusion.dit.depth=3"]).diffusion
    net = d.network_config(channels=3, resolution=16, num_classes=10)
    assert isinstance(net, DiTConfig)
    assert (net.in_channels, net.input_size, net.num_classes, net.depth) == (3, 16, 10, 3)


# --------------------------------------------------------------------------- round trips, docs, files


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "configs").glob("*.yaml")))
def test_every_preset_loads_and_round_trips(name, tmp_path):
    cfg = config.load(REPO / "configs" / name)
    text = config.to_yaml(cfg)
    (tmp_path / "again.yaml").write_text(text)
    again = config.load(tmp_path / "again.yaml")
    assert again == cfg and config.to_yaml(again) == text


def test_tiny_yaml_spells_out_every_key():
    assert yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text()) == config.to_dict(config.Config())


def test_config_show_docs_lists_every_key_with_default_and_constraints(capsys):
    assert main(["config", "show", "--docs"]) == 0
    out = capsys.readouterr().out
    keys = [line.split(" = ")[0] for line in out.splitlines() if not line.startswith(" ")]

    def leaves(tree, prefix=""):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]

    assert keys == list(leaves(config.to_dict(config.Config())))
    assert "data.resolution = 32\n    Side of the square output images in pixels. (in [1, 8192])" in out


def test_loading_touches_no_file(monkeypatch):
    """Validation never looks at the paths a config names: they are checked where they are used.
    Every stat/open/listing during the load is recorded (and still performed, so that anything
    else running meanwhile is undisturbed)."""
    touched = []

    def recording(original):
        def call(path, *args, **kwargs):
            touched.append(str(path))
            return original(path, *args, **kwargs)

        return call

    with monkeypatch.context() as patch:
        for module, name in [
            (os, "stat"),
            (os, "lstat"),
            (os, "listdir"),
            (os, "scandir"),
            (os, "access"),
            (builtins, "open"),
            (io, "open"),
        ]:
            patch.setattr(module, name, recording(getattr(module, name)))
        cfg = config.load(
            overrides=["data.source=folder", "data.path=/no/such/folder", "diffusion.deepspeed=/no/such/zero2.json"]
        )
    assert cfg.diffusion.deepspeed == "/no/such/zero2.json"
    assert not [path for path in touched if path.startswith("/no/such")]


def test_a_missing_deepspeed_file_is_reported_by_the_runtime(tmp_path):
    from pipeline.errors import LatentpipeError
    from pipeline.runtime.dist import Runtime

    absent = tmp_path / "zero2.json"
    cfg = config.load(overrides=[f"diffusion.deepspeed={absent}"])
    with pytest.raises(LatentpipeError, match=f"{absent} does not exist: use one of configs/deepspeed"):
        Runtime(deepspeed=cfg.diffusion.deepspeed)


def test_nested_unknown_key_suggests_the_full_key():
    with pytest.raises(ConfigError, match="did you mean 'diffusion.dit.depth'"):
        config.load(overrides=["diffusion.dit.dept=2"])


def test_one_validation_style():
    """Sections check themselves in __post_init__ (declared constraints + check()); a leftover
    loader-called validate(self, key) would never run."""
    assert not [cls.__name__ for _, cls in _sections() if hasattr(cls, "validate")]
