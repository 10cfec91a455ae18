"""The value every ingest source produces and every later stage consumes: a float policy graph."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from edgeq.spaces import BoxSpec

OBS_INPUT = "obs"
ACTIONS_OUTPUT = "actions"


@dataclass(frozen=True)
class StateSpec:
    """One recurrent state tensor carried between calls (per environment in a batch).

    The graph takes ``input_name`` [batch, *shape] and returns the next state as ``output_name``.
    At an episode start the state is ``zeros`` (the convention of LSTM policies in SB3 and rsl_rl).
    """

    input_name: str
    output_name: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input_name, "output": self.output_name, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StateSpec:
        return cls(str(d["input"]), str(d["output"]), tuple(int(s) for s in d["shape"]))


@dataclass(frozen=True)
class HistorySpec:
    """The observation history a policy reads, kept by the runtime (:mod:`edgeq.deploy.history`).

    The graph input ``input_name`` is ``[batch, length * obs_dim]``: the last ``length``
    observations, oldest first (the current one last); before the episode start the window holds
    zeros (``reset="zeros"``) or the episode's first observation (``reset="first-observation"``).
    ``act(obs)`` still takes one observation: the runtime keeps the window.
    """

    length: int
    obs_dim: int
    input_name: str = OBS_INPUT
    layout: str = "oldest-first, flattened [batch, length * obs_dim]"
    reset: str = "zeros"

    def to_json(self) -> dict[str, Any]:
        return {"input": self.input_name, "length": self.length, "obs_dim": self.obs_dim, "layout": self.layout,
                "reset": self.reset}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> HistorySpec:
        return cls(int(d["length"]), int(d["obs_dim"]), str(d.get("input", OBS_INPUT)),
                   reset=str(d.get("reset", "zeros")))


@dataclass(frozen=True)
class PolicySource:
    """Where a policy came from, for the manifest."""

    path: str
    sha256: str
    kind: str  # "sb3", "onnx", "torchscript", "torch-module"
    algorithm: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "sha256": self.sha256, "kind": self.kind,
                "algorithm": self.algorithm, "details": self.details}


@dataclass
class FloatPolicy:
    """A deterministic float policy as an ONNX graph plus what is needed to run it in an env.

    ``model`` maps ``obs`` [batch, *obs_space.shape] (float32) to ``actions``
    [batch, *action_space.shape] (float32) in the env's own action units: observation
    normalization and action squashing/rescaling/clipping are inside the graph, in float32.
    Recurrent policies have extra state inputs/outputs described by ``state``, and ``gate_nodes``
    names the MatMul nodes of their unrolled cell (int8 by default; kept float with
    ``cell_precision="fp32"``). History policies (``history``) read the last observations as
    one flattened input that the runtime fills (:class:`HistorySpec`). Later stages read only these
    fields, never ``source.details`` (which is what the manifest records about the source).
    """

    model: onnx.ModelProto
    obs_space: BoxSpec
    action_space: BoxSpec
    source: PolicySource
    state: tuple[StateSpec, ...] = ()
    gate_nodes: tuple[str, ...] = ()
    history: HistorySpec | None = None
    env_id: str | None = None
    preprocess: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] = field(default_factory=dict)

    input_name: str = OBS_INPUT
    output_name: str = ACTIONS_OUTPUT

    @property
    def recurrent(self) -> bool:
        return bool(self.state)

    @property
    def input_size(self) -> int:
        """Width of the graph's observation input: ``length * obs_dim`` for a history policy."""
        return self.history.length * self.history.obs_dim if self.history else self.obs_space.size
