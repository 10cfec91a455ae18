"""The shapes of the bundle's JSON records, as types (stdlib ``typing`` only; docs/bundle-format.md).

:class:`Manifest` is ``manifest.json``; :class:`Decision` its ``decision``; :class:`ValidationResult`
is ``validation.json`` (plus, in memory, the measured values that go to ``measurements.json``) and
:class:`TargetResult` one of its ``targets``. They are :class:`~typing.TypedDict` s: the JSON stays
plain dicts (the files are byte-for-byte what they were), while the code that builds and reads them
is checked by mypy against one declaration. Keys marked ``Required`` are present in every record
edgeq writes; the others are optional (older bundles, or a measurement that was not made).
Readers must ignore keys they do not know (docs/bundle-format.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:  # Python >= 3.11; annotations are not evaluated at run time (the robot may run 3.10)
    from typing import Required


# ---------------------------------------------------------------------------------------------------
# manifest.json


class Space(TypedDict, total=False):
    """``observation_space`` / ``action_space``: a Box (infinite bounds as the strings ``"inf"``/``"-inf"``)."""

    type: str
    shape: Required[list[int]]
    dtype: str
    low: list[float | str]
    high: list[float | str]


class StateSpec(TypedDict):
    """One recurrent state tensor of ``io.state``: fed ``[batch, *shape]`` at ``input``, next at ``output``."""

    input: str
    output: str
    shape: list[int]


class HistorySpec(TypedDict, total=False):
    """``io.history``: the policy reads the last ``length`` observations, flattened oldest first."""

    input: Required[str]
    length: Required[int]
    obs_dim: Required[int]
    layout: str
    reset: str


class ManifestIO(TypedDict, total=False):
    """``io``: the graph's observation input and action output, recurrent state, observation history."""

    input: Required[str]
    output: Required[str]
    state: list[StateSpec]
    history: HistorySpec


class EngineRecord(TypedDict, total=False):
    """One entry of ``engines``: a TensorRT engine and the facts to check before loading it."""

    file: Required[str]
    precision: Required[str]
    tensorrt_version: Required[str]
    compute_capability: Required[str]
    gpu_name: str
    engine_sha256: str
    min_batch: int
    opt_batch: int
    max_batch: int
    strongly_typed: bool
    hardware_compatibility_level: str


class DecisionReturns(TypedDict, total=False):
    """The returns part of a target's decision: the interval of the mean paired difference and the band."""

    status: str | None
    mean: float | None
    sd: float | None
    interval: list[float] | None
    band: list[float | None] | None
    method: str | None
    level: float | None


class DecisionFailures(TypedDict, total=False):
    """The failure-rate part of a target's decision."""

    status: str | None
    float_failures: int | None
    int8_failures: int | None
    only_int8: int | None
    only_float: int | None
    interval: list[float] | None
    fail_tol: float | None
    rule: str | None


class DecisionTarget(TypedDict):
    """One target of ``decision.targets`` (or ``decision.all_int8_cpu``): its files, episodes and verdict."""

    status: str | None
    float_model: str | None
    int8_model: str | None
    runtime: str | None
    episodes: int | None
    stop_reason: str | None
    needed_episodes: int | None
    returns: DecisionReturns
    failures: DecisionFailures
    outcomes: dict[str, dict[str, int] | None]


class Decision(TypedDict, total=False):
    """``decision`` (format 2): the verdict, the procedure that reached it, per target the record."""

    status: Required[str]
    exit_code: Required[int]
    procedure: dict[str, Any] | None
    tolerance: dict[str, Any] | None
    failure_rule: dict[str, Any] | None
    targets: Required[dict[str, DecisionTarget]]
    all_int8_cpu: DecisionTarget


class ManifestBody(TypedDict, total=False):
    """What ``edgeq quantize`` describes of a bundle: the manifest before the writer adds the format version
    and the files' SHA-256 (:class:`Manifest`)."""

    observation_space: Required[Space]
    action_space: Required[Space]
    io: Required[ManifestIO]
    models: Required[dict[str, str]]
    cpu_float_layers: list[str]
    cpu_layer_selection: dict[str, Any]
    file_precision: dict[str, dict[str, Any]]
    pruning: dict[str, Any]
    engines: list[EngineRecord]
    edgeq_version: str
    environment: dict[str, Any]
    source: dict[str, Any]
    env: dict[str, Any] | None
    preprocess: dict[str, Any]
    postprocess: dict[str, Any]
    profile: dict[str, Any]
    calibration: dict[str, Any]
    quantization: dict[str, Any]
    config: dict[str, Any]
    mixed_precision: dict[str, Any]
    decision: Decision
    tensorrt_qdq_check: dict[str, Any]


class Manifest(ManifestBody, total=False):
    """``manifest.json`` (docs/bundle-format.md). ``format_version``, ``files``, the spaces, ``io`` and
    ``models`` are what a reader relies on (:func:`edgeq.deploy.bundle_format.check_manifest`)."""

    format_version: Required[int]
    files: Required[dict[str, str]]
    unhashed: list[str]


# ---------------------------------------------------------------------------------------------------
# validation.json


class SideResult(TypedDict, total=False):
    """``float`` / ``int8`` of a target: the episodes of one side on the validation seeds."""

    seeds: Required[list[int]]
    returns: Required[list[float]]
    lengths: list[int]
    terminated: list[bool]
    outcomes: list[str]
    mean: Required[float]
    std: Required[float]
    min: float
    max: float
    episodes: int
    termination_rate: float
    terminations: int
    termination_ci95: list[float]


class PairedDifference(TypedDict, total=False):
    """``paired_difference``: int8 − float return per seed, its mean, spread and 95% interval."""

    mean: Required[float]
    std: float
    ci95: Required[list[float]]
    relative_mean: Required[float]
    ratio_of_means: float | None
    per_episode: Required[list[float]]


class TargetVerdict(TypedDict, total=False):
    """``verdict`` of a target: the status and the reasons, the returns and failures parts."""

    status: Required[str]
    passed: bool
    exit_code: int
    episodes: int
    returns: dict[str, Any]
    failures: dict[str, Any]
    needed_episodes: int | None
    reasons: list[str]
    distinguishable_from_floor: bool | None
    floor_text: str
    files: dict[str, Any]
    stop_reason: str


class TargetResult(TypedDict, total=False):
    """One entry of ``validation.json``'s ``targets`` (or its ``all_int8_cpu``): one runtime's comparison.
    Without an env (``closed_loop`` false) a target holds only ``action_error`` on the held-out observations
    (and the files it compared)."""

    float: SideResult
    int8: SideResult
    paired_difference: PairedDifference
    termination_difference: dict[str, Any]
    action_error: Required[dict[str, dict[str, Any]]]
    termination: dict[str, Any]
    outcomes: dict[str, Any]
    divergence: dict[str, Any]
    runtime: str
    providers: list[str]
    float_model: str
    int8_model: str
    int8_runtime: str
    episodes: dict[str, Any]
    action_error_series: dict[str, Any]
    noise_floor: dict[str, Any]
    verdict: TargetVerdict
    saturation: dict[str, Any]
    perturbed: dict[str, Any]
    latency: dict[str, Any]
    latency_notes: list[str]
    notes: list[str]
    role: str
    seconds: float  # bundles of edgeq 0.1 (now in measurements.json's timings)


class ValidationResult(TypedDict, total=False):
    """``validation.json`` of a closed-loop validation (``closed_loop`` true); in memory also the measured
    values (``timings``, ``latency``, ``made_utc``) that go to ``measurements.json``."""

    env_id: Required[str | None]
    closed_loop: bool
    seeds: list[int]
    targets: Required[dict[str, TargetResult]]
    unavailable_targets: dict[str, str]
    tolerance: dict[str, Any]
    options: dict[str, Any]
    all_int8_cpu: TargetResult
    verdict: dict[str, Any]
    episodes: dict[str, Any]
    per_layer: dict[str, Any] | None
    sensitivity: dict[str, Any] | None
    sizes: dict[str, int]
    warnings: list[str]
    perturbation: list[dict[str, Any]]
    reason: str
    held_out: dict[str, Any]
    timings: dict[str, float]
    validation_timings: dict[str, float]
    made_utc: str
    cpu_layer_timing: dict[str, Any]
