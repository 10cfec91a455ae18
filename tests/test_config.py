"""edgeq.config.QuantizeConfig: one set of defaults, exact round trips, checked overrides, the CLI's --set."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeq.config import (
    CONFIG_VERSION,
    KEYWORD_FIELDS,
    RECIPE_FIELDS,
    ConfigError,
    QuantizeConfig,
    keyword_overrides,
    parse_set,
)

ROOT = Path(__file__).resolve().parent.parent


def _some_config() -> QuantizeConfig:
    return QuantizeConfig.from_recipe(None, "jetson-orin", env="Pendulum-v1").with_overrides({
        "quantization.rounding": "nearest", "calibration.exploration.gaussian": 0.25,
        "calibration.holdout_exploration.epsilon": 0.0, "calibration.calibrator_params.percentile": 99.9,
        "validation.episodes": 7, "source.action_low": [-1, -2], "export.cpu_float_layers": []})


def test_round_trips_exactly(tmp_path: Path) -> None:
    for config in (QuantizeConfig(), _some_config()):
        data = config.to_dict()
        assert data["version"] == CONFIG_VERSION
        assert QuantizeConfig.from_dict(data) == config
        assert QuantizeConfig.from_dict(json.loads(json.dumps(data))) == config  # as the manifest stores it
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        assert QuantizeConfig.from_yaml(path) == config
    c = _some_config()
    assert c.source.action_low == (-1.0, -2.0) and c.validation.episodes == 7
    assert c.calibration.holdout_exploration is not None and c.calibration.holdout_exploration.gaussian == 0.1
    assert c.calibration.calibrator_params == {"percentile": 99.9} and c.export.name == "jetson-orin"


def test_frozen_and_overrides_copy() -> None:
    base = QuantizeConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        base.quantization.rounding = "nearest"  # type: ignore[misc]
    changed = base.with_overrides({"quantization.rounding": "nearest", "quantization.alpha": 1})
    assert (changed.quantization.rounding, changed.quantization.alpha) == ("nearest", 1.0)
    assert base.quantization.rounding == "adaround"  # the original is unchanged


@pytest.mark.parametrize(("overrides", "needle"), [
    ({"nope.x": 1}, "unknown config field 'nope.x'"),
    ({"rounding": "nearest"}, "unknown config field 'rounding'"),
    ({"quantization.roundng": "nearest"}, "quantization has weight_method"),
    ({"quantization.fp16_fallback": "two"}, "'quantization.fp16_fallback': expected int, got 'two'"),
    ({"quantization.auto": 1}, "'quantization.auto': expected bool"),
    ({"calibration.exploration.sigma": 1.0}, "calibration.exploration has gaussian, epsilon"),
    ({"quantization.rounding.x": 1}, "'quantization.rounding' is str"),
    ({"validation.targets": "cpu"}, "'validation.targets': expected a list of str"),
])
def test_override_errors_name_the_field(overrides: dict[str, object], needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        QuantizeConfig().with_overrides(overrides)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_from_bundle_replays_the_measured_cpu_choice(tmp_path: Path) -> None:
    config = _some_config().with_overrides({"export.cpu_float_layers": None})
    manifest = {"config": config.to_dict(), "cpu_layer_selection": {"method": "measured", "float_layers": ["a/Gemm"]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert QuantizeConfig.from_bundle(tmp_path).export.cpu_float_layers == ("a/Gemm",)
    assert QuantizeConfig.from_bundle(tmp_path, replay_cpu_layers=False) == config
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ConfigError, match="no 'config'"):
        QuantizeConfig.from_bundle(tmp_path)


def test_from_dict_refuses_unknown_sections_and_newer_versions() -> None:
    with pytest.raises(ConfigError, match="unknown config section"):
        QuantizeConfig.from_dict({"calibrate": {}})
    with pytest.raises(ConfigError, match="config version 99"):
        QuantizeConfig.from_dict({"version": 99})
    with pytest.raises(ConfigError, match="unknown config field"):
        QuantizeConfig.from_dict({"quantization": {"nope": 1}})


def test_one_set_of_defaults() -> None:
    """The shipped default recipe says what the dataclass defaults say; env recipes change only what they list;
    the quantization options are made from the config in one place."""
    default = yaml.safe_load((ROOT / "calibration" / "default.yaml").read_text())
    plain = QuantizeConfig()
    recipe = plain.recipe_record()
    assert {k: recipe[k] for k in default} == default
    pend = QuantizeConfig.from_recipe(None, env="Pendulum-v1")
    assert (pend.calibration.recipe, pend.calibration.episodes, pend.calibration.holdout_episodes) == \
        ("Pendulum-v1", 20, 5)
    assert pend.quantization == plain.quantization and pend.export == plain.export
    assert QuantizeConfig.from_recipe(None, env="NoSuchEnv-v0").calibration.recipe == "default"
    opts = pend.quant_options()
    for key, path in RECIPE_FIELDS.items():
        section, name = path.split(".")
        if hasattr(opts, key) and key != "seed":  # QuantOptions.seed is AdaRound's, not the calibration seed
            want = getattr(getattr(pend, section), name)
            assert getattr(opts, key) == (list(want) if isinstance(want, tuple) else want), key
    assert all(p.count(".") >= 1 and p.split(".")[0] in plain.to_dict() for p in KEYWORD_FIELDS.values())
    # every stage option is a config field (new QuantOptions fields must be added to the config too)
    from edgeq.quantizers.build import QuantOptions

    internal = {"auto_calibrators", "auto_transforms", "auto_weight_methods", "seed"}
    assert {f.name for f in dataclasses.fields(QuantOptions)} - internal - set(RECIPE_FIELDS) == set()


def test_bad_recipe_values_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text("episodes: ten\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: config field 'calibration.episodes': expected int"):
        QuantizeConfig.from_recipe(str(bad))
    bad.write_text("epsiodes: 10\n")
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['epsiodes'\]"):
        QuantizeConfig.from_recipe(str(bad))
    with pytest.raises(ConfigError, match="no export file 'nope'"):
        QuantizeConfig.from_recipe(None, "nope")
    with pytest.raises(ConfigError, match="rounding must be one of"):
        QuantizeConfig().with_overrides({"quantization.rounding": "bogus"}).quant_options()


def test_keyword_layer_maps_onto_the_config() -> None:
    """The flat keywords of edgeq.quantize (and the CLI's options) become the same overrides as before."""
    from edgeq.calibration.collect import ExplorationNoise
    from edgeq.validate.verdict import Tolerance

    over = keyword_overrides({"calibrator": "max", "calib_episodes": 4, "episodes": 3, "seed": None,
                              "exploration": ExplorationNoise(0.2, 0.0), "tolerance": Tolerance(relative=0.05),
                              "recipe_overrides": {"fp16_fallback": 0, "failure": "none"}, "perturb": ["push:speed=1"]})
    assert over == {"calibration.calibrator": "max", "calibration.calibrator_params": {},
                    "calibration.episodes": 4, "validation.episodes": 3,
                    "calibration.exploration": {"gaussian": 0.2, "epsilon": 0.0},
                    "validation.rel_tol": 0.05, "validation.abs_tol": None, "validation.one_sided": True,
                    "validation.fail_tol": 0.02, "quantization.fp16_fallback": 0, "validation.failure": "none",
                    "validation.perturb": ["push:speed=1"]}
    c = QuantizeConfig().with_overrides(over)
    assert c.calibration.calibrator_params == {} and c.validation.perturb == ("push:speed=1",)
    with pytest.raises(ConfigError, match="unknown recipe field 'name'"):
        keyword_overrides({"recipe_overrides": {"name": "x"}})
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsiodes'"):
        keyword_overrides({"epsiodes": 3})
    assert parse_set(["quantization.rounding=nearest", "validation.episodes=5", "calibration.data=null",
                      "quantization.keep_float=[a, b]"]) == {
        "quantization.rounding": "nearest", "validation.episodes": 5, "calibration.data": None,
        "quantization.keep_float": ["a", "b"]}


def test_api_refuses_a_config_with_a_recipe(tmp_path: Path) -> None:
    import edgeq
    from edgeq.errors import EdgeqError

    with pytest.raises(EdgeqError, match="either a config or a recipe"):
        edgeq.quantize("x.zip", "Pendulum-v1", tmp_path / "b", QuantizeConfig(), recipe="default")
    with pytest.raises(ConfigError, match="unknown config field 'quantization.nope'"):
        edgeq.quantize("x.zip", "Pendulum-v1", tmp_path / "b", overrides={"quantization.nope": 1})
    assert not (tmp_path / "b").exists()


def test_cli_set_unknown_field_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "b"
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "quantize", str(tmp_path / "missing.zip"), "--env",
                          "Pendulum-v1", "--out", str(out), "--set", "nope.x=1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (res.stdout, res.stderr)
    err = res.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "unknown config field 'nope.x'" in err, err
    assert not out.exists()


@pytest.mark.parametrize(("args", "needle"), [
    (["--set", "quantization.fp16_fallback=two"], "'quantization.fp16_fallback': expected int, got 'two'"),
    (["--set", "rounding"], "expected section.field=value"),
    (["--set", "quantization.input_headroom=0.5"], "input_headroom must be a factor in [1, 16]"),
    (["--config", "missing.yaml"], "missing.yaml: cannot read"),
    (["--recipe", "default", "--config", "c.yaml"], "--config already holds a recipe"),
])
def test_cli_config_errors_are_one_line_exit_2(args: list[str], needle: str, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgeq.cli import app

    out = tmp_path / "b"
    res = CliRunner().invoke(app, ["quantize", str(tmp_path / "missing.zip"), "--env", "Pendulum-v1", "--out",
                                   str(out), *args])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error:") and needle in " ".join(err.split()), err
    assert len(err.splitlines()) == 1, err
    assert not out.exists()


def test_a_version_1_config_keeps_the_single_search_start() -> None:
    """auto_starts came with version 2: an older config (a bundle's manifest) makes what it made then."""
    old = QuantizeConfig().to_dict()
    old["version"] = 1
    del old["quantization"]["auto_starts"]
    assert QuantizeConfig.from_dict(old).quantization.auto_starts == "recipe"
    assert QuantizeConfig.from_dict({"version": 1}).quantization.auto_starts == "recipe"
    assert QuantizeConfig.from_dict({}).quantization.auto_starts == "first-layer"
    assert QuantizeConfig().quant_options().auto_starts == "first-layer"
    new = QuantizeConfig().to_dict()
    assert new["version"] == 3 and QuantizeConfig.from_dict(new) == QuantizeConfig()
    v2 = {"version": 2}
    assert QuantizeConfig.from_dict(v2).quantization.affine_input is False
    assert QuantizeConfig.from_dict(v2).quantization.split_outliers == 0.0
    assert QuantizeConfig.from_dict(v2).quantization.auto_starts == "first-layer"
    assert QuantizeConfig().quantization.affine_input is True and QuantizeConfig().quantization.split_outliers == 0.05
