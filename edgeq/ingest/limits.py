"""Caps on what a policy file may ask edgeq to allocate, checked before the allocation.

A robot-control policy is small (kilobytes to a few megabytes: observations and actions of at most
a few hundred features, a handful of layers of at most a few thousand units). A file whose header
asks for far more is corrupt or hostile; edgeq refuses it with a message naming the field and the
cap instead of spending minutes and gigabytes before failing. Every cap is far above any real
policy's needs.
"""

from __future__ import annotations

from pathlib import Path

from edgeq.errors import PolicyFormatError

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
