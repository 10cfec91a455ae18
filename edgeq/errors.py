"""Errors that edgeq reports to users as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class EdgeqError(Exception):
    """A problem with the user's input or environment, described in one line.

    The message names the file, node or field at fault and what was expected. The CLI prints it as
    ``error: <message>`` and exits non-zero; ``--debug`` adds the traceback.
    """


class PolicyFormatError(EdgeqError):
    """A policy file is missing, corrupt, or holds something edgeq does not support."""


class EnvironmentSpecError(EdgeqError):
    """An environment id or entry point cannot be made, or does not match the policy."""


class BundleError(EdgeqError):
    """A bundle is incomplete, was modified after export, or was built for another target."""


class InputError(EdgeqError):
    """An observation handed to a deployed policy has the wrong shape, dtype or values."""


class BrokenFloatPolicyError(PolicyFormatError, ValueError):
    """The float policy itself is wrong (NaN/inf or absurdly large weights or activations): edgeq refuses
    to quantize it, since no comparison with such a reference can pass honestly."""
