"""Stable-Baselines3 / sb3-contrib archives → :class:`~edgeq.policy.FloatPolicy`.

The deterministic action path of each supported algorithm, as SB3's
``predict(obs, deterministic=True)`` computes it:

* SAC, TQC, CrossQ: ``latent_pi`` MLP → ``mu`` (→ Hardtanh(±clip_mean) with gSDE) → tanh →
  rescale [-1, 1] to the action bounds. CrossQ's eval-mode BatchRenorm layers are affine maps.
* TD3 (and DDPG): ``mu`` MLP ending in tanh → rescale.
* PPO, A2C, TRPO: ``mlp_extractor`` (shared then policy layers) → ``action_net`` → clip to the
  bounds (or tanh → rescale when trained with ``squash_output``).

Observation normalization from a ``vecnormalize.pkl`` becomes an fp32 pre-op in the graph.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import PolicyFormatError
from edgeq.graph.builder import TORCH_ACTIVATIONS
from edgeq.graph.layers import (
    Activation,
    Affine,
    Clip,
    Layer,
    Linear,
    Normalize,
    RescaleFromUnit,
    Tanh,
    fold_affines,
    layers_to_onnx,
)
from edgeq.ingest.limits import MAX_LAYERS, check_layers
from edgeq.ingest.safe_pickle import global_name
from edgeq.ingest.sb3_archive import SB3Archive, read_archive
from edgeq.ingest.vecnormalize import ObsNormalization, default_vecnormalize_path, read_vecnormalize
from edgeq.policy import FloatPolicy, PolicySource

SUPPORTED_ALGORITHMS = ("SAC", "TD3", "DDPG", "TQC", "CrossQ", "PPO", "A2C", "TRPO")

_MODULE_TO_ALGO = {
    "stable_baselines3.sac.policies": "SAC",
    "stable_baselines3.td3.policies": "TD3",
    "sb3_contrib.tqc.policies": "TQC",
    "sb3_contrib.crossq.policies": "CrossQ",
}
_DEFAULT_ACTIVATION = {"SAC": "relu", "TD3": "relu", "DDPG": "relu", "TQC": "relu", "CrossQ": "relu",
                       "PPO": "tanh", "A2C": "tanh", "TRPO": "tanh"}


def detect_algorithm(archive: SB3Archive) -> str:
    """Name the algorithm from the saved policy class and the algorithm's own ``data`` fields."""
    cls = archive.policy_class()
    module = cls.rsplit(".", 1)[0]
    if module in _MODULE_TO_ALGO:
        algo = _MODULE_TO_ALGO[module]
        # DDPG is TD3 with policy_delay=1 and no target smoothing noise clip
        if algo == "TD3" and archive.data.get("policy_delay") == 1 and archive.data.get("target_noise_clip") == 0.0:
            return "DDPG"
        return algo
    if "recurrent" in cls.lower():
        raise PolicyFormatError(f"{archive.path}: recurrent policy ({cls}) is not supported by the MLP loader")
    if cls.endswith("ActorCriticPolicy") or module == "stable_baselines3.common.policies":
        if "cg_max_steps" in archive.data:
            return "TRPO"
        if "clip_range" in archive.data:
            return "PPO"
        if "use_rms_prop" in archive.data or "normalize_advantage" in archive.data or "rms_prop_eps" in archive.data:
            return "A2C"
        return "PPO"
    raise PolicyFormatError(f"{archive.path}: unsupported policy class {cls or '(unknown)'}; "
                            f"edgeq reads {', '.join(SUPPORTED_ALGORITHMS)}")


def policy_activation(kw: dict[str, Any], algo: str, path: Path) -> str:
    """The activation of an SB3 policy's MLP (``policy_kwargs.activation_fn``, else ``algo``'s default)."""
    fn = kw.get("activation_fn")
    if fn is None:
        return _DEFAULT_ACTIVATION[algo]
    name = (global_name(fn) or str(fn)).rsplit(".", 1)[-1]
    if name not in TORCH_ACTIVATIONS:
        raise PolicyFormatError(f"{path}: policy_kwargs.activation_fn {name!r} is not supported; expected one of "
                                f"{sorted(TORCH_ACTIVATIONS)}")
    return TORCH_ACTIVATIONS[name]


def _sequential(sd: dict[str, np.ndarray], prefix: str, activation: str, *, trailing_activation: bool,
                bn_eps: float) -> list[Layer]:
    """The layers of an ``nn.Sequential`` saved under ``prefix`` (``prefix.<i>.<param>``).

    Indices with a 2-D ``weight`` are Linear, with ``ra_mean`` BatchRenorm, with ``running_mean``
    BatchNorm1d; indices without parameters between them are the activation.
    """
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.(\w+)$")
    idx: dict[int, dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        m = pat.match(key)
        if m:
            idx.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not idx:
        return []
    if max(idx) >= MAX_LAYERS:
        raise PolicyFormatError(f"policy.pth key {prefix}.{max(idx)}.*: layer index {max(idx)} is above edgeq's "
                                f"limit of {MAX_LAYERS} layers per network (a corrupt or hostile state dict)")
    layers: list[Layer] = []
    for i in range(max(idx) + 1):
        params = idx.get(i)
        name = f"{prefix}.{i}"
        if params is None:
            layers.append(Activation(activation))
        elif "weight" in params and params["weight"].ndim == 2:
            layers.append(Linear(name, params["weight"].astype(np.float32),
                                 params["bias"].astype(np.float32) if "bias" in params else None))
        elif "ra_mean" in params or "running_mean" in params:
            mean = (params["ra_mean"] if "ra_mean" in params else params["running_mean"]).astype(np.float64)
            var = (params["ra_var"] if "ra_var" in params else params["running_var"]).astype(np.float64)
            gamma = params.get("scale", params.get("weight", np.ones_like(mean))).astype(np.float64)
            beta = params.get("bias", np.zeros_like(mean)).astype(np.float64)
            scale = gamma / np.sqrt(var + bn_eps)
            layers.append(Affine(name, scale.astype(np.float32), (beta - mean * scale).astype(np.float32)))
        else:
            raise PolicyFormatError(f"layer {name} has parameters {sorted(params)}; expected a Linear or a "
                                    "BatchNorm/BatchRenorm layer")
    if trailing_activation:
        layers.append(Activation(activation))
    return layers


def _linear(sd: dict[str, np.ndarray], name: str) -> Linear:
    return Linear(name, sd[f"{name}.weight"].astype(np.float32), sd[f"{name}.bias"].astype(np.float32))


def _require(sd: dict[str, np.ndarray], keys: list[str], path: Path, algo: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise PolicyFormatError(f"{path}: policy.pth lacks {missing} expected for a {algo} policy "
                                f"(found {sorted(sd)[:8]}...)")


def actor_layers(archive: SB3Archive, algo: str) -> tuple[list[Layer], dict[str, Any]]:
    """The deterministic action path as layers, plus a description for the manifest."""
    sd, path = archive.state_dict, archive.path
    kw = archive.policy_kwargs()
    act = policy_activation(kw, algo, path)
    action = archive.space("action_space")
    low, high = action.low_array.ravel(), action.high_array.ravel()
    use_sde = bool(archive.data.get("use_sde", kw.get("use_sde", False)))
    info: dict[str, Any] = {"activation": act, "use_sde": use_sde}
    bn_eps = float(kw.get("batch_norm_eps", 1e-3))
    layers: list[Layer]
    if algo in ("SAC", "TQC", "CrossQ"):
        layers = _sequential(sd, "actor.latent_pi", act, trailing_activation=algo != "CrossQ", bn_eps=bn_eps)
        if algo == "CrossQ":
            # CrossQ's latent_pi is [BRN, Linear, act]*n + [BRN]: indices without params are activations,
            # and the trailing BRN has parameters, so nothing is appended.
            pass
        if "actor.mu.0.weight" in sd:  # gSDE: mu = Sequential(Linear, Hardtanh(-clip_mean, clip_mean))
            clip_mean = float(kw.get("clip_mean", 2.0))
            layers += [_linear(sd, "actor.mu.0"), Clip(-clip_mean, clip_mean, "clip_mean")]
            info["clip_mean"] = clip_mean
        else:
            _require(sd, ["actor.mu.weight"], path, algo)
            layers.append(_linear(sd, "actor.mu"))
        layers += [Tanh(), RescaleFromUnit(low, high)]
        info["squashed"] = True
    elif algo in ("TD3", "DDPG"):
        _require(sd, ["actor.mu.0.weight"], path, algo)
        layers = _sequential(sd, "actor.mu", act, trailing_activation=False, bn_eps=bn_eps)
        layers += [Tanh(), RescaleFromUnit(low, high)]
        info["squashed"] = True
    else:  # PPO, A2C, TRPO
        _require(sd, ["action_net.weight"], path, algo)
        layers = _sequential(sd, "mlp_extractor.shared_net", act, trailing_activation=True, bn_eps=bn_eps)
        layers += _sequential(sd, "mlp_extractor.policy_net", act, trailing_activation=True, bn_eps=bn_eps)
        layers.append(_linear(sd, "action_net"))
        squash = bool(kw.get("squash_output", False))
        if squash:
            layers += [Tanh(), RescaleFromUnit(low, high)]
        else:
            layers.append(Clip(low, high, "clip_actions"))
        info["squashed"] = squash
    if not any(isinstance(layer, Linear) for layer in layers):
        raise PolicyFormatError(f"{path}: found no actor layers for {algo}")
    info["net_arch"] = [int(layer.weight.shape[0]) for layer in layers if isinstance(layer, Linear)][:-1]
    return layers, info


def load_sb3(path: str | Path, *, vecnormalize: str | Path | None = None, algorithm: str | None = None,
             fold_batchnorm: bool = True, frame_stack: int = 0) -> FloatPolicy:
    """Load an SB3 / sb3-contrib archive as a float ONNX policy (never unpickling the archive).

    ``vecnormalize`` names a ``vecnormalize.pkl``; when None, the RL Zoo location
    ``NAME/vecnormalize.pkl`` beside ``NAME.zip`` is used if it exists. With ``frame_stack`` > 1
    (SB3's VecFrameStack outside VecNormalize, as the RL Zoo stacks) the statistics of one frame
    are applied to each stacked frame.
    """
    archive = read_archive(path)
    algo = algorithm or detect_algorithm(archive)
    if algo not in SUPPORTED_ALGORITHMS:
        raise PolicyFormatError(f"{archive.path}: algorithm {algo!r} is not supported; expected one of "
                                f"{', '.join(SUPPORTED_ALGORITHMS)}")
    obs_space = archive.space("observation_space")
    action_space = archive.space("action_space")
    if len(obs_space.shape) != 1 or len(action_space.shape) != 1:
        raise PolicyFormatError(f"{archive.path}: observation shape {obs_space.shape} / action shape "
                                f"{action_space.shape}; expected 1-D vectors")
    try:
        layers, info = actor_layers(archive, algo)
    except PolicyFormatError as exc:
        if str(archive.path) in str(exc):
            raise
        raise PolicyFormatError(f"{archive.path}: {exc}") from None
    first = next(layer for layer in layers if isinstance(layer, Linear))
    if first.weight.shape[1] != obs_space.size:
        raise PolicyFormatError(f"{archive.path}: first layer takes {first.weight.shape[1]} inputs but the "
                                f"observation space has {obs_space.size}")

    vn_path = Path(vecnormalize) if vecnormalize is not None else default_vecnormalize_path(archive.path)
    norm: ObsNormalization | None = None
    if vecnormalize is not None or vn_path.exists():
        norm = read_vecnormalize(vn_path)
    preprocess: dict[str, Any] = {}
    if norm is not None:
        if frame_stack > 1 and norm.mean.shape == (obs_space.size // frame_stack,):
            norm = replace(norm, mean=np.tile(norm.mean, frame_stack), var=np.tile(norm.var, frame_stack))
        if norm.mean.shape != (obs_space.size,):
            raise PolicyFormatError(f"{vn_path}: obs_rms.mean has shape {norm.mean.shape}, expected "
                                    f"({obs_space.size},) for this policy's observations")
        layers = [Normalize("obs_norm", norm.mean.astype(np.float32), norm.std.astype(np.float32),
                            norm.clip_obs)] + layers
        preprocess = {"normalize": {"source": str(vn_path), "clip": norm.clip_obs, "epsilon": norm.epsilon,
                                    "features": int(norm.mean.size)}}
        if frame_stack > 1:
            # after a reset, SB3's VecFrameStack pads with zeros after normalization: the raw value
            # that normalizes to zero is the mean, which the env's frame stack pads with
            preprocess["normalize"]["frame_stack"] = frame_stack
            preprocess["normalize"]["pad"] = [float(v) for v in norm.mean[: obs_space.size // frame_stack]]
    check_layers(layers, obs_space.size, action_space.size, f"{archive.path}: policy.pth")
    folded: list[str] = []
    if fold_batchnorm:
        layers, folded = fold_affines(layers, keep_leading=True)
    info["folded_batchnorm"] = folded
    model = layers_to_onnx(layers, obs_space.size, action_space.size, f"{algo.lower()}_actor",
                           metadata={"edgeq.source": archive.path.name, "edgeq.algorithm": algo})
    source = PolicySource(path=str(archive.path), sha256=archive.sha256, kind="sb3", algorithm=algo,
                          details={"sb3_version": archive.sb3_version, **info})
    return FloatPolicy(model=model, obs_space=obs_space, action_space=action_space, source=source,
                       preprocess=preprocess,
                       postprocess={"squash": "tanh" if info["squashed"] else None,
                                    "rescale" if info["squashed"] else "clip": "action_space"})
