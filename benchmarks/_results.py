"""Writing a benchmark's markdown section (shared by the scripts in ``benchmarks/``)."""

from __future__ import annotations

from pathlib import Path


def append_section(path: str | Path, text: str) -> None:
    """Append ``text`` and a blank line to the results file ``path`` (created with its folder), then print it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(text + "\n")
    print(text)
