"""The ``edgeq`` command line: thin wrappers, each one call into the stages.

Commands live in :mod:`edgeq.commands` (one module per group); importing them registers them.
"""

from __future__ import annotations

import functools
from typing import Any

import typer

from edgeq.commands import check as _check  # noqa: F401  (registers check)
from edgeq.commands import compare as _compare  # noqa: F401  (registers compare)
from edgeq.commands import quantize as _quantize  # noqa: F401  (registers quantize, info)
from edgeq.commands import search as _search  # noqa: F401  (registers search)
from edgeq.commands import serve as _serve  # noqa: F401  (registers serve)
from edgeq.commands import validate as _validate  # noqa: F401  (registers validate)
from edgeq.commands._app import app


@functools.lru_cache(maxsize=1)
def _command() -> Any:
    """The click command typer builds from the app (built once: typer re-reads every signature per build)."""
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every failure, usage errors included, is one line ``error: ...`` and exit status 2."""
    import sys

    from typer.exceptions import Abort, TyperException

    from edgeq.commands._app import fail_one_line

    try:
        code = _command().main(args=argv, prog_name="edgeq", standalone_mode=False)
    except TyperException as exc:  # usage errors: a missing argument, an unknown option or command
        if not exc.format_message():  # no arguments: the help was printed
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        where = ctx.command_path if ctx is not None else "edgeq"
        fail_one_line(f"{exc.format_message()} (see `{where} --help`)", code=2)
    except (Abort, KeyboardInterrupt):
        fail_one_line("interrupted", code=130)
    except Exception as exc:  # noqa: BLE001 - output after the guarded work (e.g. printing the summary)
        from edgeq.commands._app import describe_error, is_debug

        if is_debug():
            raise
        fail_one_line(describe_error(exc))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
