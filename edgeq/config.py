"""Calibration recipes (``calibration/*.yaml``) and export target profiles (``export/*.yaml``).

Both are small YAML files users edit. A name is looked up as a path first, then as
``calibration/NAME.yaml`` / ``export/NAME.yaml`` in the current directory, then in the directories
beside the edgeq package (a source checkout), then in the copies an installed wheel carries as
package data (``edgeq/_data/recipes``, ``edgeq/_data/profiles``; see setup.py), read through
:mod:`importlib.resources`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError

_REPO_ROOT = Path(__file__).resolve().parent.parent
#: checkout folder → package-data folder of an installed wheel (setup.py copies one into the other)
PACKAGE_DATA = {"calibration": "recipes", "export": "profiles"}


@dataclass
class CalibrationRecipe:
    """How to calibrate: rollouts of the float policy (with exploration noise) and the quantizers."""

    name: str = "default"
    env: str | None = None
    episodes: int = 10
    seed: int = 1_000_000
    num_envs: int = 8
    max_steps_per_episode: int | None = None
    exploration: dict[str, float] = field(default_factory=lambda: {"gaussian": 0.1, "epsilon": 0.1})
    calibrator: str = "percentile"
    calibrator_params: dict[str, Any] = field(default_factory=lambda: {"percentile": 99.99})
    weight_method: str = "absmax"
    keep_float: list[str] = field(default_factory=list)
    # held-out episodes (after the calibration seeds) whose states score per-layer decisions
    holdout_episodes: int = 2
    holdout_exploration: dict[str, float] | None = None  # None: the same as ``exploration``
    # the quantization stages of edgeq.quantizers.build.QuantOptions (same names and meaning); the
    # defaults are the settings benchmarks/results/defaults.md measured to keep the return
    transform: str = "crossquant"
    transform_layers: str = "first"
    alpha: float | None = 0.0
    dynamic: bool = False
    auto: bool = True
    auto_sweeps: int = 1
    rounding: str = "adaround"
    adaround_iters: int = 0
    bias_correction: bool = True
    # 0: every layer int8; mixed precision is the search's job (issue 12 part 4), labelled as such
    fp16_fallback: int = 0
    max_action_error: float = 0.1
    tail_weight: float = 0.1
    tail_fraction: float = 0.01
    tail_on_calibration_states: bool = True
    # which validation episode ends are failures (edgeq.validate.outcomes): None = a termination is a
    # failure; "none" = the task has no failures; or a predicate on the last step, e.g. "reward<=-100"
    failure: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def quant_options(self) -> Any:
        """The :class:`~edgeq.quantizers.build.QuantOptions` this recipe asks for (clear error if invalid)."""
        from edgeq.quantizers.build import QuantOptions

        try:
            return QuantOptions(
                calibrator=self.calibrator, calibrator_params=dict(self.calibrator_params),
                weight_method=self.weight_method, transform=self.transform, transform_layers=self.transform_layers,
                alpha=self.alpha, dynamic=bool(self.dynamic), auto=bool(self.auto), auto_sweeps=int(self.auto_sweeps),
                rounding=self.rounding, adaround_iters=int(self.adaround_iters),
                bias_correction=bool(self.bias_correction), fp16_fallback=int(self.fp16_fallback),
                max_action_error=float(self.max_action_error), tail_weight=float(self.tail_weight),
                tail_fraction=float(self.tail_fraction),
                tail_on_calibration_states=bool(self.tail_on_calibration_states), keep_float=list(self.keep_float))
        except (TypeError, ValueError) as exc:
            raise EdgeqError(f"calibration recipe {self.name!r}: {exc}") from None


@dataclass
class ExportProfile:
    """Where the bundle will run: runtime, opset, precisions and the batch range."""

    name: str = "cpu-ort"
    runtime: str = "onnxruntime"
    opset: int = 17
    precisions: list[str] = field(default_factory=lambda: ["int8"])
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 4096
    #: ONNX Runtime CPU file only: layers whose input or output width is below this run in float on
    #: their int8 weights (ORT's integer GEMM costs more per call than such a layer's arithmetic);
    #: 0 quantizes every layer there too. The TensorRT/CUDA files are not affected.
    cpu_float_below: int = 32
    #: How policy.int8.cpu.onnx decides which layers run in float on their int8 weights: "measured" (time
    #: the CPU file at batch 1 for candidate choices at export, keep the fastest; edgeq.export.cpu_select)
    #: or "width" (the cpu_float_below rule alone; cpu_float_below 0 = every layer INT8, never measured).
    #: The choice is recorded in the manifest.
    cpu_layer_selection: str = "measured"
    #: Replay a recorded choice: exactly these layers run in float in the CPU file (no timing); [] = none.
    cpu_float_layers: list[str] | None = None
    tensorrt: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


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


def _load(cls: type, kind: str, name: str, required: bool) -> Any:
    import yaml

    path = _find(kind, name)
    if path is None:
        if required:
            raise EdgeqError(f"no {kind} file {name!r} (looked for a path, ./{kind}/{name}.yaml and the ones "
                             f"edgeq ships: {', '.join(shipped_names(kind)) or 'none found'})")
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise EdgeqError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise EdgeqError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgeqError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    data.setdefault("name", path.name.removesuffix(".yaml").removesuffix(".yml"))
    return cls(**data)


def load_recipe(name: str | None, env_id: str | None = None) -> CalibrationRecipe:
    """The named recipe; without a name, ``calibration/<env_id>.yaml`` if present, else defaults."""
    if name:
        recipe: CalibrationRecipe = _load(CalibrationRecipe, "calibration", name, required=True)
        return recipe
    if env_id:
        found = _load(CalibrationRecipe, "calibration", env_id, required=False)
        if found is not None:
            return found  # type: ignore[no-any-return]
    default = _load(CalibrationRecipe, "calibration", "default", required=False)
    return default if default is not None else CalibrationRecipe()


def load_profile(name: str = "cpu-ort") -> ExportProfile:
    profile: ExportProfile = _load(ExportProfile, "export", name, required=True)
    return profile
