"""Caps on what a policy file may ask edgeq to allocate, checked before the allocation.

A robot-control policy is small (kilobytes to a few megabytes: observations and actions of at most
a few hundred features, a handful of layers of at most a few thousand units). A file whose header
asks for far more is corrupt or hostile; edgeq refuses it with a message naming the field and the
cap instead of spending minutes and gigabytes before failing. Every cap is far above any real
policy's needs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.errors import BrokenFloatPolicyError, PolicyFormatError
from edgeq.graph.layers import Affine, Clip, Layer, Linear, Normalize, RescaleFromUnit

#: Largest policy file edgeq reads (a .zip, .onnx, .pt or vecnormalize.pkl).
MAX_FILE_BYTES = 512 << 20
#: Largest uncompressed ``data`` entry of an SB3 archive (JSON; normally a few tens of KiB).
MAX_DATA_ENTRY_BYTES = 64 << 20
#: Largest uncompressed ``policy.pth`` (and any other entry edgeq reads) of an SB3 archive.
MAX_WEIGHTS_ENTRY_BYTES = 512 << 20
#: Most layers of one network (``net_arch`` entries, activations and normalizations included).
MAX_LAYERS = 256
#: Widest layer, observation or action vector.
MAX_WIDTH = 1 << 16
#: Largest |weight| of a policy layer: trained policies stay many orders of magnitude below; above it
#: the policy is broken in float (e.g. weights scaled by 1e36) and is refused.
MAX_ABS_WEIGHT = 1e12
#: Most elements of one weight tensor (64 M floats = 256 MiB).
MAX_TENSOR_ELEMENTS = 1 << 26


def check_file_size(path: Path, what: str, limit: int = MAX_FILE_BYTES) -> None:
    """Raise :class:`PolicyFormatError` if ``path`` is larger than ``limit`` bytes."""
    size = path.stat().st_size
    if size > limit:
        raise PolicyFormatError(f"{path}: {size / (1 << 20):.0f} MiB is larger than any {what} edgeq reads "
                                f"({limit >> 20} MiB); pass the policy file itself")


def check_dim(value: int, where: str, limit: int = MAX_WIDTH) -> None:
    if value > limit:
        raise PolicyFormatError(f"{where} is {value}, above edgeq's limit of {limit} (a corrupt or hostile file; "
                                "real policies are far smaller)")


def check_elements(shape: tuple[int, ...] | list[int], where: str) -> None:
    n = 1
    for d in shape:
        if d < 0:
            raise PolicyFormatError(f"{where} has a negative dimension in shape {tuple(shape)}")
        n *= int(d)
    if n > MAX_TENSOR_ELEMENTS:
        raise PolicyFormatError(f"{where} has shape {tuple(shape)} ({n} elements), above edgeq's limit of "
                                f"{MAX_TENSOR_ELEMENTS} elements per tensor (a corrupt or hostile file)")


def check_layers(layers: list[Layer], obs_dim: int, act_dim: int, origin: str) -> None:
    """Raise :class:`PolicyFormatError` naming the first layer whose shapes do not chain from ``obs_dim`` to
    ``act_dim``, whose values are NaN/inf, or that is above edgeq's size limits (checked before the graph
    is built, so a bad state dict is one clear message rather than an ONNX shape-inference error)."""
    if len(layers) > MAX_LAYERS:
        raise PolicyFormatError(f"{origin}: {len(layers)} layers, above edgeq's limit of {MAX_LAYERS}")
    check_dim(obs_dim, f"{origin}: observation size")
    check_dim(act_dim, f"{origin}: action size")
    width = obs_dim

    def vector(name: str, what: str, value: np.ndarray | float, n: int, *, allow_inf: bool = False) -> None:
        arr = np.asarray(value)
        if arr.ndim and arr.shape != (n,):
            raise PolicyFormatError(f"{origin}: {name} {what} has shape {arr.shape}, expected ({n},) to match the "
                                    "layer before it")
        bad = np.isnan(arr) if allow_inf else ~np.isfinite(arr)
        if np.any(bad):
            raise BrokenFloatPolicyError(f"{origin}: {name} {what} holds NaN/inf values; the policy is broken in float "
                                    "(retrain it or load an earlier checkpoint)")

    for layer in layers:
        if isinstance(layer, Linear):
            w = layer.weight
            if w.ndim != 2:
                raise PolicyFormatError(f"{origin}: {layer.name}.weight has shape {w.shape}, expected [out, in]")
            check_dim(int(w.shape[0]), f"{origin}: {layer.name}.weight output size")
            if w.shape[1] != width:
                raise PolicyFormatError(f"{origin}: {layer.name}.weight has shape {tuple(w.shape)}: it takes "
                                        f"{w.shape[1]} inputs but the layer before it gives {width}")
            if not np.all(np.isfinite(w)):
                raise BrokenFloatPolicyError(f"{origin}: {layer.name}.weight holds NaN/inf values; the policy is "
                                             "broken in float (retrain it or load an earlier checkpoint)")
            if w.size and float(np.abs(w).max()) > MAX_ABS_WEIGHT:
                raise BrokenFloatPolicyError(f"{origin}: {layer.name}.weight reaches {float(np.abs(w).max()):.3g}, "
                                             f"above {MAX_ABS_WEIGHT:g}; no trained policy has such weights, so it "
                                             "is broken in float (retrain it or load an earlier checkpoint)")
            width = int(w.shape[0])
            if layer.bias is not None:
                vector(layer.name, "bias", layer.bias, width)
        elif isinstance(layer, Affine):
            vector(layer.name, "scale", layer.scale, width)
            vector(layer.name, "shift", layer.shift, width)
        elif isinstance(layer, Normalize):
            vector(layer.name, "mean", layer.mean, width)
            vector(layer.name, "std", layer.std, width)
            if np.any(np.asarray(layer.std) <= 0):
                raise PolicyFormatError(f"{origin}: {layer.name} std has values <= 0; expected positive")
        elif isinstance(layer, RescaleFromUnit):
            vector(layer.name, "low", layer.low, width)
            vector(layer.name, "high", layer.high, width)
        elif isinstance(layer, Clip):
            vector(layer.name, "low", layer.low, width, allow_inf=True)
            vector(layer.name, "high", layer.high, width, allow_inf=True)
    if width != act_dim:
        raise PolicyFormatError(f"{origin}: the last layer gives {width} values but the action space has "
                                f"{act_dim}")
