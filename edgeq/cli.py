"""The ``edgeq`` command line: thin wrappers, each one call into the stages.

Commands live in :mod:`edgeq.commands` (one module per group); importing them registers them.
"""

from __future__ import annotations

from edgeq.commands import check as _check  # noqa: F401  (registers check)
from edgeq.commands import compare as _compare  # noqa: F401  (registers compare)
from edgeq.commands import quantize as _quantize  # noqa: F401  (registers quantize, info)
from edgeq.commands import serve as _serve  # noqa: F401  (registers serve)
from edgeq.commands import validate as _validate  # noqa: F401  (registers validate)
from edgeq.commands._app import app


def main() -> None:
    app()


if __name__ == "__main__":
    main()
