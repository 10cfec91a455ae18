"""The Q critic saved in an off-policy SB3 / sb3-contrib archive, as a numpy function ``Q(obs, action)``.

SAC, TD3, DDPG, TQC and CrossQ archives carry their critics next to the actor (``critic.qf<i>.*``, TQC
``critic.quantile_critics.<i>.*``). edgeq uses a critic only to weight quantization errors by what
they cost in value (:mod:`edgeq.quantizers.sensitivity`); the policy that ships is the actor alone.
The archive is read without unpickling (:mod:`edgeq.ingest.sb3_archive`), and VecNormalize's
observation statistics apply to the critic's input as to the actor's.

Actions enter the critic as SB3 stores them in the replay buffer: scaled to ``[-1, 1]`` from the
action space's bounds (``scale_action``), then concatenated after the (normalized) observation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.graph.layers import Activation, Affine, Layer, Linear
from edgeq.ingest.sb3 import _sequential, detect_algorithm, policy_activation
from edgeq.ingest.sb3_archive import read_archive
from edgeq.ingest.vecnormalize import default_vecnormalize_path, read_vecnormalize

__all__ = ["Critic", "load_sb3_critic"]

_ACT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0.0),
    "tanh": np.tanh,
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "softplus": lambda x: np.logaddexp(0.0, x),
}


@dataclass(frozen=True)
class Critic:
    """``Q(obs, action)``: the mean over the archive's critic networks (and TQC's quantiles).

    Attributes:
        nets: Each critic network as layers (input ``[obs_norm, action_unit]``).
        obs_mean, obs_std, obs_clip: VecNormalize statistics (None: raw observations).
        action_low, action_high: The action space's bounds (actions are scaled to ``[-1, 1]``).
        algorithm: SB3 algorithm name.
    """

    nets: tuple[tuple[Layer, ...], ...]
    action_low: np.ndarray
    action_high: np.ndarray
    algorithm: str
    obs_mean: np.ndarray | None = None
    obs_std: np.ndarray | None = None
    obs_clip: float | None = None

    def __call__(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """``[N]`` Q values of ``actions`` (env units, ``[N, act]``) at ``obs`` (raw, ``[N, obs]``)."""
        x = np.asarray(obs, np.float64)
        if self.obs_mean is not None and self.obs_std is not None:
            x = (x - self.obs_mean) / self.obs_std
            if self.obs_clip is not None:
                x = np.clip(x, -self.obs_clip, self.obs_clip)
        lo, hi = self.action_low.astype(np.float64), self.action_high.astype(np.float64)
        a = 2.0 * (np.asarray(actions, np.float64) - lo) / (hi - lo) - 1.0
        xa = np.concatenate([x, a], axis=1).astype(np.float32)  # the critic's own precision
        outs = []
        for net in self.nets:
            h = xa
            for layer in net:
                if isinstance(layer, Linear):
                    h = h @ layer.weight.T + (0.0 if layer.bias is None else layer.bias)
                elif isinstance(layer, Affine):
                    h = h * layer.scale + layer.shift
                elif isinstance(layer, Activation):
                    h = _ACT[layer.kind](h)
            outs.append(h.astype(np.float64).mean(axis=1))
        return np.mean(outs, axis=0)


def load_sb3_critic(path: str | Path, *, vecnormalize: str | Path | None = None) -> Critic | None:
    """The archive's Q critic, or None when it has none (PPO/A2C/TRPO) or its layout is not recognised."""
    archive = read_archive(path)
    algo = detect_algorithm(archive)
    if algo not in ("SAC", "TD3", "DDPG", "TQC", "CrossQ"):
        return None
    sd = archive.state_dict
    kw = archive.policy_kwargs()
    act = policy_activation(kw, algo, archive.path)
    if act not in _ACT:
        return None
    bn_eps = float(kw.get("batch_norm_eps", 1e-3))
    nets = []
    for i in range(16):
        prefix = next((p for p in (f"critic.qf{i}", f"critic.quantile_critics.{i}") if f"{p}.0.weight" in sd
                       or any(k.startswith(p + ".") for k in sd)), None)
        if prefix is None:
            break
        layers = _sequential(sd, prefix, act, trailing_activation=False, bn_eps=bn_eps)
        if layers:
            nets.append(tuple(layers))
    if not nets:
        return None
    space = archive.space("action_space")
    vn = Path(vecnormalize) if vecnormalize is not None else default_vecnormalize_path(archive.path)
    norm = read_vecnormalize(vn) if (vecnormalize is not None or vn.exists()) else None
    return Critic(tuple(nets), space.low_array.ravel().astype(np.float64), space.high_array.ravel().astype(np.float64),
                  algo, None if norm is None else norm.mean.astype(np.float64),
                  None if norm is None else norm.std.astype(np.float64), None if norm is None else norm.clip_obs)
