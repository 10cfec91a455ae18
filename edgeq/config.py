"""One configuration for ``edgeq quantize``: :class:`QuantizeConfig`, its YAML files and its overrides.

A :class:`QuantizeConfig` is frozen and versioned; its sections say how the policy is read
(:class:`SourceConfig`), calibrated (:class:`CalibrationConfig`), quantized
(:class:`QuantizationConfig`), exported (:class:`ExportConfig`) and validated
(:class:`ValidationConfig`). The defaults below are the only defaults: the Python API
(:func:`edgeq.quantize`), the CLI (``edgeq quantize``, one table :data:`KEYWORD_FIELDS` plus
``--set section.field=value``) and :meth:`QuantizeConfig.quant_options` (the
:class:`~edgeq.quantizers.build.QuantOptions` of the quantization stage) all start from them.

Two kinds of YAML file:

* a **config** (:meth:`QuantizeConfig.from_yaml`): a mapping of sections, as written by
  :meth:`QuantizeConfig.to_dict` (every bundle's ``manifest.json`` holds one under ``config``);
* a **recipe** (``calibration/*.yaml``) and a **profile** (``export/*.yaml``), the small flat files
  users edit (:meth:`QuantizeConfig.from_recipe`): a recipe's keys are fields of the calibration and
  quantization sections (plus ``failure``, of validation); a profile's are the export section's.

A recipe or profile name is looked up as a path first, then as ``calibration/NAME.yaml`` /
``export/NAME.yaml`` in the current directory, then in the directories beside the edgeq package (a
source checkout), then in the copies an installed wheel carries as package data
(``edgeq/_data/recipes``, ``edgeq/_data/profiles``; see setup.py), read through
:mod:`importlib.resources`. Without a recipe name, ``calibration/<env id>.yaml`` is used when one
exists, else ``calibration/default.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, ClassVar, Union

from edgeq.errors import EdgeqError

#: Version of the config's layout (``to_dict()["version"]``); bumped when a field is renamed or removed,
#: or when a new field's default changes what an older config made. 2: ``quantization.auto_starts``
#: (default ``first-layer``); a version-1 config without it means ``recipe``, what edgeq then did.
#: 3: ``quantization.affine_input`` on and ``quantization.split_outliers`` 0.05 by default; an older
#: config without them means off / 0.
CONFIG_VERSION = 3

_REPO_ROOT = Path(__file__).resolve().parent.parent
#: checkout folder → package-data folder of an installed wheel (setup.py copies one into the other)
PACKAGE_DATA = {"calibration": "recipes", "export": "profiles"}


class ConfigError(EdgeqError):
    """A config field that does not exist, or a value of the wrong type (one line, naming the field)."""


# ---------------------------------------------------------------------------------------------------
# type checking of field values (one place: construction, from_dict, from_yaml and overrides)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {', '.join(f.name for f in fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` as type ``tp`` (ints widen to float, lists become tuples), else a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, where)
            except ConfigError:
                continue
    elif tp is Any:
        return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            item = typing.get_args(tp)[0]
            return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): v for k, v in value.items()}
    elif isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _from_mapping(tp, value, where)
    raise ConfigError(f"config field {where!r}: expected {_type_name(tp)}, got {value!r}")


def _from_mapping(cls: Any, data: Mapping[str, Any], where: str) -> Any:
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(f'{where}.{k}' for k in unknown)}; "
                          f"{where} has {', '.join(known)}")
    return cls(**{k: data[k] for k in known if k in data})


class _Section:
    """Frozen config section: every field is checked against its annotation on construction."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = _coerce(getattr(self, f.name), hints[f.name], f"{self.SECTION}.{f.name}")
            object.__setattr__(self, f.name, value)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (tuples as lists, nested sections as mappings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------------
# the sections


@dataclass(frozen=True)
class Exploration(_Section):
    """Calibration action noise: ``gaussian`` std as a fraction of the action half-range; ``epsilon`` the
    probability of a uniform random action instead (:class:`~edgeq.calibration.collect.ExplorationNoise`)."""

    SECTION: ClassVar[str] = "calibration.exploration"

    gaussian: float = 0.1
    epsilon: float = 0.1


@dataclass(frozen=True)
class SourceConfig(_Section):
    """How to read the policy and make its env (what the policy file itself does not say).

    ``vecnormalize``: SB3 ``vecnormalize.pkl`` (default: beside the archive). ``onnx_input`` /
    ``onnx_output``: an ONNX policy's observation input and action output, if several.
    ``history_reset``: what fills a history policy's window at an episode start, as it was trained
    (``zeros``, the default, or ``first-observation``).
    ``action_low`` / ``action_high``: an ONNX policy's action bounds (a number or one per dimension;
    default: the env's). ``history``: a flat ONNX input stacking this many observations.
    ``env_kwargs``, ``env_wrappers`` (``class.path[:{json kwargs}]``) and ``frame_stack``: how the env
    was made in training (an RL Zoo folder supplies them when unset).
    """

    SECTION: ClassVar[str] = "source"

    vecnormalize: str | None = None
    onnx_input: str | None = None
    onnx_output: str | None = None
    action_low: float | tuple[float, ...] | None = None
    action_high: float | tuple[float, ...] | None = None
    history: int | None = None
    history_reset: str | None = None
    env_kwargs: dict[str, Any] | None = None
    env_wrappers: tuple[str, ...] | None = None
    frame_stack: int | None = None


@dataclass(frozen=True)
class CalibrationConfig(_Section):
    """Where the calibration states come from and how activation ranges are computed.

    Rollouts of the float policy (with ``exploration`` noise) on seeds ``seed ... seed+episodes-1``
    (disjoint from the validation seeds) in ``env`` (default: the validation env; ``env_kwargs``
    default to the validation env's when it is the same env) under the disturbances ``perturb``;
    ``holdout_episodes`` more episodes score the per-layer decisions. Or ``data`` (a ``.npz`` of
    observations, ``minari:ID`` or a Minari dataset directory; ``data_key`` names the array): logged
    observations, of which the last ``holdout_fraction`` is held out when there is no env.
    ``recipe`` names the recipe file the values came from.
    """

    SECTION: ClassVar[str] = "calibration"

    recipe: str = "default"
    episodes: int = 10
    seed: int = 1_000_000
    num_envs: int = 8
    max_steps_per_episode: int | None = None
    exploration: Exploration = field(default_factory=Exploration)
    holdout_episodes: int = 2
    holdout_exploration: Exploration | None = None  # None: the same as ``exploration``
    calibrator: str = "percentile"
    calibrator_params: dict[str, Any] = field(default_factory=lambda: {"percentile": 99.99})
    env: str | None = None
    env_kwargs: dict[str, Any] | None = None
    perturb: tuple[str, ...] = ()
    data: str | None = None
    data_key: str | None = None
    holdout_fraction: float = 0.2


@dataclass(frozen=True)
class QuantizationConfig(_Section):
    """The quantization stages (:class:`~edgeq.quantizers.build.QuantOptions`, same names and meaning);
    the defaults are the settings benchmarks/results/defaults.md measured to keep the return.
    ``cell_precision``: a recurrent policy's LSTM/GRU gate MatMuls in ``int8`` or kept in ``fp32``."""

    SECTION: ClassVar[str] = "quantization"

    weight_method: str = "absmax"
    transform: str = "crossquant"
    transform_layers: str = "first"
    alpha: float | None = 0.0
    dynamic: bool = False
    auto: bool = True
    auto_sweeps: int = 1
    #: one search per input rewrite of the first layer, the best kept (QuantOptions.auto_starts)
    auto_starts: str = "first-layer"
    rounding: str = "adaround"
    adaround_iters: int = 0
    reconstruct_iters: int = 600
    reconstruct_seconds: float = 90.0
    reconstruct_scales: bool = True
    objective: str = "action"
    bias_correction: bool = True
    # 0: every layer int8; mixed precision is the search's job (issue 12 part 4), labelled as such
    fp16_fallback: int = 0
    max_action_error: float = 0.1
    tail_weight: float = 0.1
    tail_fraction: float = 0.01
    tail_on_calibration_states: bool = True
    keep_float: tuple[str, ...] = ()
    cell_precision: str = "int8"
    #: structured pruning before quantization (edgeq.quantizers.prune): this fraction of every hidden
    #: layer's units (lowest saliency) removed; 0 = none. Validated against the unpruned float policy.
    prune: float = 0.0
    #: outlier channel splitting (edgeq.quantizers.split, OCS): at most this fraction of each hidden layer's
    #: width is added as duplicated-and-halved units where they lower the modelled int8 error; exact in
    #: float, kept only if the held-out score after the per-layer search drops; 0 = off. Default 0.05
    #: since config version 3 (benchmarks/results/int8_methods.md: with affine_input, the only setting
    #: that PASSed the hard fixture with margin, and on fresh seeds)
    split_outliers: float = 0.05
    #: NoisyQuant (edgeq.quantizers.noisy): a fixed seeded noise on each int8 layer's input, removed exactly
    #: through its bias, where it lowers the layer's held-out output error; off by default
    noisy_bias: bool = False
    #: AffineQuant on the observation input (edgeq.quantizers.affine): a learned per-channel scale and shift
    #: folded exactly into a Sub/Mul pre-op and the first layer, kept only if the held-out score drops;
    #: on by default since config version 3
    affine_input: bool = True
    #: the observation input's int8 range widened by this factor after every other stage, a margin for
    #: states beyond calibration (QuantOptions.input_headroom); 1 = as calibrated
    input_headroom: float = 1.0


@dataclass(frozen=True)
class ExportConfig(_Section):
    """Where the bundle will run (an export profile): runtime, opset, precisions and the batch range.

    ``cpu_float_below``: ONNX Runtime CPU file only: layers whose input or output width is below this
    run in float on their int8 weights (ORT's integer GEMM costs more per call than such a layer's
    arithmetic); 0 quantizes every layer there too. ``cpu_layer_selection``: how policy.int8.cpu.onnx
    decides which layers run in float: ``measured`` (time candidate choices at export, keep the
    fastest; :mod:`edgeq.export.cpu_select`) or ``width`` (the ``cpu_float_below`` rule alone).
    ``cpu_float_layers``: replay a recorded choice, exactly these layers in float (no timing).
    """

    SECTION: ClassVar[str] = "export"

    name: str = "cpu-ort"
    runtime: str = "onnxruntime"
    opset: int = 17
    precisions: tuple[str, ...] = ("int8",)
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4096
    cpu_float_below: int = 32
    cpu_layer_selection: str = "measured"
    cpu_float_layers: tuple[str, ...] | None = None
    tensorrt: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``profile``."""
        return self.to_dict()


@dataclass(frozen=True)
class ValidationConfig(_Section):
    """Paired float/int8 validation on seeds ``seed, seed+1, ...``.

    ``episodes``: ``"auto"`` (batches until PASS or FAIL, at most ``max_episodes`` or ``time_budget``
    seconds; :mod:`edgeq.validate.sequential`) or a number. The band: int8 may lose ``rel_tol`` x
    |float mean| (or ``abs_tol`` return units), its failure rate may exceed float's by ``fail_tol``;
    ``failure`` says which episode ends are failures (:mod:`edgeq.validate.outcomes`; None: a
    termination). ``perturb``: also validate under these disturbances; ``saturation_warn``: warn when a
    quantized tensor leaves its range more often. The last fields are what the validator measures
    (:class:`~edgeq.validate.validator.ValidationOptions`; defaults: ``edgeq quantize``'s light set).
    """

    SECTION: ClassVar[str] = "validation"

    episodes: int | str = "auto"
    seed: int = 0
    max_episodes: int = 200
    time_budget: float | None = None
    targets: tuple[str, ...] = ("cpu",)
    rel_tol: float = 0.01
    abs_tol: float | None = None
    one_sided: bool = True
    fail_tol: float = 0.02
    failure: str | None = None
    num_envs: int = 8
    perturb: tuple[str, ...] = ()
    saturation_warn: float = 1e-3
    report: bool = True
    detail_episodes: int = 30
    floor_draws: int = 3
    sensitivity: bool = False
    sensitivity_draws: int = 3
    per_layer: bool = True
    per_layer_states: int = 4096
    latency_calls: int = 2000
    latency_large_batch: int = 1024


#: section name → its class, in the order of a config file
SECTIONS: dict[str, type[_Section]] = {
    "source": SourceConfig, "calibration": CalibrationConfig, "quantization": QuantizationConfig,
    "export": ExportConfig, "validation": ValidationConfig}


@dataclass(frozen=True)
class QuantizeConfig:
    """Everything ``edgeq quantize`` does, besides its inputs (policy, env, output) and where it runs.

    Frozen: change it with :meth:`with_overrides` (checked names and types), never by assignment.
    ``to_dict``/``from_dict`` round-trip exactly; every bundle's manifest stores ``to_dict()`` under
    ``config``, and :meth:`from_bundle` reads it back, so quantizing again from it makes the same files.
    """

    source: SourceConfig = field(default_factory=SourceConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            object.__setattr__(self, name, _coerce(getattr(self, name), cls, name))

    # -- data ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"version": CONFIG_VERSION, "source": {...}, "calibration": {...}, ...}``."""
        return {"version": CONFIG_VERSION, **{name: getattr(self, name).to_dict() for name in SECTIONS}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, origin: str = "config") -> QuantizeConfig:
        """The config of ``to_dict()`` data (missing fields take the defaults); ``origin`` names the source
        in errors."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{origin}: expected a mapping of sections, got {type(data).__name__}")
        body = dict(data)
        version = body.pop("version", CONFIG_VERSION)
        if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CONFIG_VERSION:
            raise ConfigError(f"{origin}: config version {version!r}; this edgeq reads versions 1 to "
                              f"{CONFIG_VERSION} (upgrade edgeq)")
        if isinstance(body.get("quantization", {}), Mapping):
            before = {**({"auto_starts": "recipe"} if version < 2 else {}),
                      **({"affine_input": False, "split_outliers": 0.0} if version < 3 else {})}
            if before:
                body["quantization"] = {**before, **body.get("quantization", {})}
        unknown = sorted(set(body) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"{origin}: unknown config section(s) {', '.join(unknown)}; expected some of "
                              f"{', '.join(SECTIONS)}")
        try:
            return cls(**{name: body[name] for name in SECTIONS if name in body})
        except ConfigError as exc:
            if origin == "config":
                raise
            raise ConfigError(f"{origin}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> QuantizeConfig:
        """A config file: a YAML mapping of sections (``to_dict()``'s layout)."""
        return cls.from_dict(_read_yaml(Path(path)), origin=str(path))

    @classmethod
    def from_bundle(cls, bundle: str | Path, *, replay_cpu_layers: bool = True) -> QuantizeConfig:
        """The config a bundle was made with (its manifest's ``config``).

        With ``replay_cpu_layers`` the CPU file's float layers that were chosen by timing at export
        (``cpu_layer_selection.float_layers``) are replayed (``export.cpu_float_layers``), so quantizing
        again makes the same ``policy.int8.cpu.onnx`` too, whatever this machine's timings."""
        path = Path(bundle) / "manifest.json"
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the manifest ({exc})") from None
        if "config" not in manifest:
            raise ConfigError(f"{path}: no 'config' (the bundle was made before edgeq stored its config)")
        config = cls.from_dict(manifest["config"], origin=f"{path} config")
        chosen = (manifest.get("cpu_layer_selection") or {}).get("float_layers")
        if replay_cpu_layers and config.export.cpu_float_layers is None and isinstance(chosen, list):
            config = config.with_overrides({"export.cpu_float_layers": chosen})
        return config

    @classmethod
    def from_recipe(cls, recipe: str | None = None, profile: str = "cpu-ort", *,
                    env: str | None = None) -> QuantizeConfig:
        """The defaults with a recipe (``calibration/``) and a profile (``export/``) applied.

        Without ``recipe``: ``calibration/<env>.yaml`` when there is one, else ``calibration/default.yaml``.
        """
        return cls(calibration=CalibrationConfig(), export=_load_profile(profile)).with_recipe(recipe, env=env)

    def with_recipe(self, recipe: str | None, *, env: str | None = None) -> QuantizeConfig:
        """This config with a recipe file's fields applied (see :meth:`from_recipe`)."""
        found = _recipe_file(recipe, env)
        if found is None:
            return self
        path, data = found
        data = dict(data)
        name = data.pop("name", path.name.removesuffix(".yaml").removesuffix(".yml"))
        data.pop("env", None)  # the env the recipe was written for: documentation only
        unknown = sorted(set(data) - set(RECIPE_FIELDS))
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(RECIPE_FIELDS)}")
        try:
            return self.with_overrides({"calibration.recipe": str(name),
                                        **{RECIPE_FIELDS[k]: v for k, v in data.items()}})
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    # -- changes -------------------------------------------------------------------------------------
    def with_overrides(self, overrides: Mapping[str, Any]) -> QuantizeConfig:
        """A copy with ``{"section.field": value, ...}`` set (``section.field.key`` reaches into a nested
        section or a mapping field). Unknown names and wrong types raise a one-line :class:`ConfigError`."""
        if not overrides:
            return self
        data = self.to_dict()
        for path, value in overrides.items():
            parts = str(path).split(".")
            if len(parts) < 2 or parts[0] not in SECTIONS:
                raise ConfigError(f"unknown config field {path!r}: expected section.field with a section among "
                                  f"{', '.join(SECTIONS)}")
            cls: Any = SECTIONS[parts[0]]
            node = data[parts[0]]
            for i, part in enumerate(parts[1:], start=1):
                last = i == len(parts) - 1
                if cls is None:  # inside a mapping field: any key
                    if last:
                        node[part] = _plain(value)
                    else:
                        node = node.setdefault(part, {})
                    continue
                names = [f.name for f in fields(cls)]
                if part not in names:
                    raise ConfigError(f"unknown config field {path!r}; {'.'.join(parts[:i])} has "
                                      f"{', '.join(names)}")
                hint = typing.get_type_hints(cls)[part]
                if last:
                    node[part] = _plain(value)
                    continue
                inner = _dataclass_in(hint)
                if inner is not None:
                    if node.get(part) is None:  # e.g. holdout_exploration: start from the defaults
                        node[part] = inner().to_dict()
                    cls, node = inner, node[part]
                elif typing.get_origin(_non_none(hint)) is dict:
                    if node.get(part) is None:
                        node[part] = {}
                    cls, node = None, node[part]
                else:
                    raise ConfigError(f"config field {'.'.join(parts[:i + 1])!r} is {_type_name(hint)}, it has no "
                                      f"field {parts[i + 1]!r}")
        return QuantizeConfig.from_dict(data)

    # -- what the stages take ------------------------------------------------------------------------
    def quant_options(self) -> Any:
        """The :class:`~edgeq.quantizers.build.QuantOptions` of this config (the only place they are made)."""
        from edgeq.quantizers.build import QuantOptions

        q, c = self.quantization, self.calibration
        try:
            return QuantOptions(
                calibrator=c.calibrator, calibrator_params=dict(c.calibrator_params), weight_method=q.weight_method,
                transform=q.transform, transform_layers=q.transform_layers, alpha=q.alpha, dynamic=q.dynamic,
                auto=q.auto, auto_sweeps=q.auto_sweeps, auto_starts=q.auto_starts, rounding=q.rounding,
                adaround_iters=q.adaround_iters,
                reconstruct_iters=q.reconstruct_iters, reconstruct_seconds=q.reconstruct_seconds,
                reconstruct_scales=q.reconstruct_scales, objective=q.objective,
                bias_correction=q.bias_correction, fp16_fallback=q.fp16_fallback,
                max_action_error=q.max_action_error, tail_weight=q.tail_weight, tail_fraction=q.tail_fraction,
                tail_on_calibration_states=q.tail_on_calibration_states, keep_float=list(q.keep_float),
                split_outliers=q.split_outliers, noisy_bias=q.noisy_bias,
                affine_input=q.affine_input, input_headroom=q.input_headroom)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"calibration recipe {c.recipe!r}: {exc}") from None

    def recipe_record(self) -> dict[str, Any]:
        """The manifest's ``calibration.recipe``: the recipe fields as one flat mapping (as recipe files
        are written), with the recipe's ``name``."""
        flat: dict[str, Any] = {"name": self.calibration.recipe}
        for key, path in RECIPE_FIELDS.items():
            section, name = path.split(".")
            flat[key] = _plain(getattr(getattr(self, section), name))
        return flat


def _non_none(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _dataclass_in(tp: Any) -> Any:
    inner = _non_none(tp)
    return inner if dataclasses.is_dataclass(inner) else None


#: recipe file key → config field (recipes are flat; ``name`` and ``env`` are descriptive)
RECIPE_FIELDS: dict[str, str] = {
    **{f.name: f"calibration.{f.name}" for f in fields(CalibrationConfig)
       if f.name in ("episodes", "seed", "num_envs", "max_steps_per_episode", "exploration", "holdout_episodes",
                     "holdout_exploration", "calibrator", "calibrator_params")},
    **{f.name: f"quantization.{f.name}" for f in fields(QuantizationConfig) if f.name != "cell_precision"},
    "failure": "validation.failure",
}

#: keyword argument of :func:`edgeq.quantize` / option of ``edgeq quantize`` → config field: the one
#: mapping from the flat names of the API and the CLI onto the config
KEYWORD_FIELDS: dict[str, str] = {
    # source
    "vecnormalize": "source.vecnormalize", "onnx_input": "source.onnx_input", "onnx_output": "source.onnx_output",
    "action_low": "source.action_low", "action_high": "source.action_high", "history": "source.history",
    "history_reset": "source.history_reset",
    "env_kwargs": "source.env_kwargs", "env_wrappers": "source.env_wrappers", "env_wrapper": "source.env_wrappers",
    "frame_stack": "source.frame_stack",
    # calibration
    "calib_episodes": "calibration.episodes", "holdout_episodes": "calibration.holdout_episodes",
    "calibrator": "calibration.calibrator", "calibrator_params": "calibration.calibrator_params",
    "noise": "calibration.exploration.gaussian", "noise_epsilon": "calibration.exploration.epsilon",
    "calib_env": "calibration.env", "calib_env_kwargs": "calibration.env_kwargs",
    "calib_perturb": "calibration.perturb", "calib_data": "calibration.data", "calib_data_key": "calibration.data_key",
    "calib_key": "calibration.data_key", "holdout_fraction": "calibration.holdout_fraction",
    "holdout": "calibration.holdout_fraction",
    # quantization
    **{name: f"quantization.{name}" for name in (
        "weight_method", "transform", "transform_layers", "alpha", "dynamic", "auto", "rounding", "bias_correction",
        "fp16_fallback", "max_action_error", "cell_precision", "prune")},
    # export
    "cpu_float_layers": "export.cpu_float_layers",
    # validation
    **{name: f"validation.{name}" for name in (
        "episodes", "seed", "max_episodes", "time_budget", "targets", "rel_tol", "abs_tol", "fail_tol", "failure",
        "num_envs", "perturb", "saturation_warn", "report")},
}

#: ValidationOptions fields a ``validation=`` keyword carries into the config
_MEASURE_FIELDS = ("targets", "detail_episodes", "floor_draws", "sensitivity", "sensitivity_draws", "per_layer",
                   "per_layer_states", "latency_calls", "latency_large_batch")


def keyword_overrides(keywords: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides (``{"section.field": value}``) from the flat keywords of :func:`edgeq.quantize` and the CLI.

    ``None`` means "not given". Besides :data:`KEYWORD_FIELDS`: ``calibrator`` without
    ``calibrator_params`` resets the parameters; ``exploration`` (an ExplorationNoise), ``tolerance``
    (a Tolerance) and ``validation`` (a ValidationOptions) set their fields; ``recipe_overrides`` sets
    recipe fields by their flat names (:data:`RECIPE_FIELDS`). An unknown keyword is a TypeError.
    """
    out: dict[str, Any] = {}
    for key, value in keywords.items():
        if value is None:
            continue
        if key == "exploration":
            out["calibration.exploration"] = {"gaussian": float(value.gaussian), "epsilon": float(value.epsilon)}
        elif key == "tolerance":
            out.update({"validation.rel_tol": value.relative, "validation.abs_tol": value.absolute,
                        "validation.one_sided": value.one_sided, "validation.fail_tol": value.fail_tol})
        elif key == "validation":
            out.update({f"validation.{name}": getattr(value, name) for name in _MEASURE_FIELDS})
            tol = value.tolerance
            out.setdefault("validation.rel_tol", tol.relative)
            out.setdefault("validation.abs_tol", tol.absolute)
            out.setdefault("validation.one_sided", tol.one_sided)
            out.setdefault("validation.fail_tol", tol.fail_tol)
        elif key == "recipe_overrides":
            for name, v in value.items():
                if name not in RECIPE_FIELDS:
                    raise ConfigError(f"unknown recipe field {name!r} in recipe_overrides; expected some of "
                                      f"{sorted(RECIPE_FIELDS)}")
                out[RECIPE_FIELDS[name]] = v
        elif key in KEYWORD_FIELDS:
            if key in ("calibrator", "weight_method", "calib_episodes") and not value:
                continue  # historic: an empty value keeps the recipe's
            if key in ("calib_perturb", "perturb", "env_wrappers", "env_wrapper", "targets"):
                value = [_spec_text(v) for v in value]
            if key in ("action_low", "action_high") and not isinstance(value, (int, float)):
                value = [float(v) for v in value]
            if key == "vecnormalize":
                value = str(value)
            if key == "calib_data":
                value = str(value)
            out[KEYWORD_FIELDS[key]] = value
        else:
            raise TypeError(f"quantize() got an unexpected keyword argument {key!r}")
    if "calibration.calibrator" in out and "calibration.calibrator_params" not in out:
        out["calibration.calibrator_params"] = {}
    # the tolerance keyword wins over the validation keyword's band
    if keywords.get("tolerance") is not None:
        tol = keywords["tolerance"]
        out.update({"validation.rel_tol": tol.relative, "validation.abs_tol": tol.absolute,
                    "validation.one_sided": tol.one_sided, "validation.fail_tol": tol.fail_tol})
    return out


def _spec_text(value: Any) -> str:
    """A perturbation or wrapper given as an object → its text form (``push:speed=1``, ``path:{json}``)."""
    if isinstance(value, str):
        return value
    path, kwargs = getattr(value, "path", None), getattr(value, "kwargs", None)
    if isinstance(path, str):  # a WrapperSpec
        return f"{path}:{json.dumps(kwargs, sort_keys=True)}" if kwargs else path
    return str(value)  # a PerturbationSpec prints as its text


def parse_set(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``--set section.field=value`` (repeatable) → overrides; the value is read as YAML (``1``, ``0.5``,
    ``true``, ``null``, ``[a, b]``, ``{percentile: 99.9}``, text)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. --set quantization.rounding=nearest")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


# ---------------------------------------------------------------------------------------------------
# recipe and profile files


def _find(kind: str, name: str) -> Path | Traversable | None:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    for root in (Path.cwd(), _REPO_ROOT):
        cand = root / kind / f"{name}.yaml"
        if cand.is_file():
            return cand
    shipped = resources.files("edgeq").joinpath("_data", PACKAGE_DATA[kind], f"{name}.yaml")
    return shipped if shipped.is_file() else None


def shipped_names(kind: str) -> list[str]:
    """The recipe (``calibration``) or profile (``export``) names available without a path."""
    names = {p.stem for root in (_REPO_ROOT, Path.cwd()) for p in (root / kind).glob("*.yaml")}
    data = resources.files("edgeq").joinpath("_data", PACKAGE_DATA[kind])
    if data.is_dir():
        names |= {t.name.removesuffix(".yaml") for t in data.iterdir() if t.name.endswith(".yaml")}
    return sorted(names)


def _read_yaml(path: Path | Traversable) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def _recipe_file(name: str | None, env_id: str | None) -> tuple[Path | Traversable, dict[str, Any]] | None:
    """The recipe to apply: the named one (required), else ``<env_id>.yaml``, else ``default.yaml``."""
    for candidate, required in ((name, True),) if name else ((env_id, False), ("default", False)):
        if not candidate:
            continue
        path = _find("calibration", candidate)
        if path is None:
            if required:
                shipped = ", ".join(shipped_names("calibration")) or "none"
                raise ConfigError(f"no calibration file {candidate!r} (looked for a path, ./calibration/{candidate}"
                                  f".yaml and the ones edgeq ships: {shipped})")
            continue
        return path, _read_yaml(path)
    return None


def _load_profile(name: str) -> ExportConfig:
    path = _find("export", name)
    if path is None:
        raise ConfigError(f"no export file {name!r} (looked for a path, ./export/{name}.yaml and the ones edgeq "
                          f"ships: {', '.join(shipped_names('export')) or 'none found'})")
    data = _read_yaml(path)
    data.setdefault("name", path.name.removesuffix(".yaml").removesuffix(".yml"))
    try:
        return _from_mapping(ExportConfig, data, "export")  # type: ignore[no-any-return]
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def load_profile(name: str = "cpu-ort") -> ExportConfig:
    """The export section of profile ``name`` (a path or a shipped name)."""
    return _load_profile(name)


#: the export section is what an export profile file holds
ExportProfile = ExportConfig
