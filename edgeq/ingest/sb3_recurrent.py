"""sb3-contrib ``RecurrentPPO`` (``MlpLstmPolicy``) archives → a recurrent :class:`~edgeq.policy.FloatPolicy`.

The deterministic action path of ``RecurrentActorCriticPolicy.predict(obs, state, episode_start,
deterministic=True)`` for one time step::

    obs → (VecNormalize, if a vecnormalize.pkl is found) → lstm_actor → mlp_extractor.policy_net
        → action_net → clip to the action bounds (or tanh → rescale with squash_output)

``lstm_actor`` becomes unrolled gate MatMuls (:mod:`edgeq.graph.recurrent`) with its state as the
graph inputs ``h_in``/``c_in`` and outputs ``h_out``/``c_out`` ([batch, n_lstm_layers, hidden]);
SB3 zeroes the state at ``episode_start``, which is what ``reset()`` does in edgeq's runtimes.
The critic (``lstm_critic``, value head) is not part of the policy and is ignored. Like
:mod:`edgeq.ingest.sb3`, the archive is never unpickled.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.graph.layers import Layer, Linear, Normalize
from edgeq.graph.recurrent import RecurrentCell, recurrent_policy_to_onnx
from edgeq.ingest.sb3 import actor_layers
from edgeq.ingest.sb3_archive import read_archive
from edgeq.ingest.vecnormalize import default_vecnormalize_path, read_vecnormalize
from edgeq.policy import FloatPolicy, PolicySource

RECURRENT_POLICY_CLASSES = ("RecurrentActorCriticPolicy",)


def is_recurrent_archive(path: str | Path) -> bool:
    """True when an SB3 ``.zip`` holds an sb3-contrib recurrent policy (reads only ``data``'s JSON)."""
    from edgeq.ingest.limits import MAX_DATA_ENTRY_BYTES

    try:
        with zipfile.ZipFile(path) as zf:
            if zf.getinfo("data").file_size > MAX_DATA_ENTRY_BYTES:
                return False  # the SB3 loader reports the oversized entry
            data = json.loads(zf.read("data").decode("utf-8"))
    except Exception:  # noqa: BLE001 - the SB3 loader reports what is wrong with the file
        return False
    if not isinstance(data, dict):
        return False
    raw = data.get("policy_class")
    module = str(raw.get("__module__", "")) if isinstance(raw, dict) else str(raw or "")
    return "recurrent" in module.lower()


def load_sb3_recurrent(path: str | Path, *, vecnormalize: str | Path | None = None) -> FloatPolicy:
    """Load a ``RecurrentPPO`` archive as a float ONNX policy with explicit LSTM state."""
    archive = read_archive(path)
    cls = archive.policy_class()
    name = cls.rsplit(".", 1)[-1]
    if name not in RECURRENT_POLICY_CLASSES:
        raise PolicyFormatError(f"{archive.path}: policy class {cls or '(unknown)'} is not supported; edgeq reads "
                                f"RecurrentPPO's MlpLstmPolicy ({', '.join(RECURRENT_POLICY_CLASSES)}) with 1-D "
                                "Box observations")
    obs_space = archive.space("observation_space")
    action_space = archive.space("action_space")
    if len(obs_space.shape) != 1 or len(action_space.shape) != 1:
        raise PolicyFormatError(f"{archive.path}: observation shape {obs_space.shape} / action shape "
                                f"{action_space.shape}; expected 1-D vectors")
    kw = archive.policy_kwargs()
    cell = RecurrentCell.from_state_dict("lstm", archive.state_dict, "lstm_actor", source=str(archive.path))
    if cell.input_size != obs_space.size:
        raise PolicyFormatError(f"{archive.path}: lstm_actor takes {cell.input_size} inputs but the observation "
                                f"space has {obs_space.size} (custom features extractors are not supported)")
    post, info = actor_layers(archive, "PPO")
    first = next(layer for layer in post if isinstance(layer, Linear))
    if first.weight.shape[1] != cell.hidden_size:
        raise PolicyFormatError(f"{archive.path}: the policy MLP takes {first.weight.shape[1]} inputs but "
                                f"lstm_actor has hidden size {cell.hidden_size}")

    vn_path = Path(vecnormalize) if vecnormalize is not None else default_vecnormalize_path(archive.path)
    pre: list[Layer] = []
    preprocess: dict[str, object] = {}
    norm = read_vecnormalize(vn_path) if vecnormalize is not None or vn_path.exists() else None
    if norm is not None:
        if norm.mean.shape != (obs_space.size,):
            raise PolicyFormatError(f"{vn_path}: obs_rms.mean has shape {norm.mean.shape}, expected "
                                    f"({obs_space.size},) for this policy's observations")
        pre = [Normalize("obs_norm", norm.mean.astype(np.float32), norm.std.astype(np.float32), norm.clip_obs)]
        preprocess = {"normalize": {"source": str(vn_path), "clip": norm.clip_obs, "epsilon": norm.epsilon}}

    graph = recurrent_policy_to_onnx(pre, cell, post, obs_space.size, action_space.size, "recurrentppo_actor",
                                     metadata={"edgeq.source": archive.path.name,
                                               "edgeq.algorithm": "RecurrentPPO"})
    info.update({"recurrent": {**cell.describe(), "gate_nodes": graph.gate_nodes},
                 "shared_lstm": bool(kw.get("shared_lstm", False))})
    source = PolicySource(path=str(archive.path), sha256=archive.sha256, kind="sb3", algorithm="RecurrentPPO",
                          details={"sb3_version": archive.sb3_version, **info})
    return FloatPolicy(model=graph.model, obs_space=obs_space, action_space=action_space, source=source,
                       state=graph.state, gate_nodes=tuple(graph.gate_nodes), preprocess=dict(preprocess),
                       postprocess={"squash": "tanh" if info["squashed"] else None,
                                    "rescale" if info["squashed"] else "clip": "action_space"})
