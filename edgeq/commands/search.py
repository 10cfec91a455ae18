"""``edgeq search BUNDLE --out DIR --max-loss 1%``: the smallest (or fastest) per-layer precision that PASSes.

Exit code 0 a candidate PASSed (``DIR/best`` is its bundle), 1 every candidate FAILed, 2 error, 3 no
candidate PASSed and not all FAILed (INCONCLUSIVE: more episodes could decide).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from edgeq.commands._app import app, console, err_console, run_guarded
from edgeq.commands.validate import parse_episodes
from edgeq.errors import EdgeqError


def parse_loss(text: str) -> float:
    """``--max-loss``: ``1%`` or ``0.01``."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
    except ValueError:
        raise EdgeqError(f"--max-loss {text!r}: expected a percentage such as 1% or a fraction such as 0.01") from None
    if not 0.0 < v < 1.0:
        raise EdgeqError(f"--max-loss {text!r}: expected a loss between 0% and 100% (e.g. 1%)")
    return v


@app.command()
def search(
    bundle: Annotated[Path, typer.Argument(help="A bundle made by edgeq quantize with an env (its all-INT8 plan is "
                                                "the starting point).")],
    out: Annotated[Path, typer.Option(help="Search directory: candidates/*, search.json and best/ (the best PASSing "
                                           "candidate as a bundle).")],
    max_loss: Annotated[str, typer.Option(help="Return loss allowed (the verdict's band): 1% or 0.01.")] = "1%",
    objective: Annotated[str, typer.Option(help="size (file bytes) or latency (batch-1 median of the CPU file, "
                                                "measured here).")] = "size",
    block_size: Annotated[int, typer.Option(help="int4 weights per output channel (0) or in blocks of this many "
                                                 "inputs (32, 64).")] = 0,
    int4_rounding: Annotated[str, typer.Option(help="int4 rounding: both (every int4 candidate with nearest and "
                                                    "with GPTQ rounding; the verdict decides), nearest, gptq, "
                                                    "brecq / gptq+brecq (nearest or GPTQ integers, then every "
                                                    "layer's rounding reconstructed jointly against the float "
                                                    "actions, int4 and int8 layers on their own grids), all "
                                                    "(nearest, gptq, gptq+brecq) or a comma list.")] = "both",
    int4_input_scaling: Annotated[bool, typer.Option(
        "--int4-input-scaling/--no-int4-input-scaling",
        help="Give the first layer's int4 weight its own observation scaling (SmoothQuant-style, chosen by held-out "
             "action error; exact float pre-op); used where it lowers that error.")] = False,
    int4_input_affine: Annotated[bool, typer.Option(
        "--int4-input-affine/--no-int4-input-affine",
        help="Also try AffineQuant's learned observation scale and shift fitted for the first layer's int4 grid "
             "(exact float pre-op); used where it lowers the held-out action error.")] = False,
    int4_hidden_split: Annotated[float, typer.Option(
        help="Also propose W4A8-ocs: W4A8 with up to this fraction of each hidden width added as weight splits "
             "chosen on the int4 grid (exact in float). 0: off.")] = 0.0,
    int4_input_split: Annotated[float, typer.Option(
        help="Also try duplicating up to this fraction of the first layer's observation columns for its int4 weight "
             "(outlier channel splitting of the input: an exact fp32 Gather pre-op, the weight column halved and "
             "copied; 0, half and all scored by held-out action error). 0: off.")] = 0.0,
    episodes: Annotated[str, typer.Option(help="Paired episodes per candidate: auto (30, then +10 until decided) or "
                                               "N.")] = "auto",
    max_episodes: Annotated[int, typer.Option(help="Cap of the auto design per candidate.")] = 200,
    seed: Annotated[int, typer.Option(help="First validation seed.")] = 0,
    fp16_layers: Annotated[int, typer.Option(help="How many of the most sensitive layers fp16 candidates may "
                                                  "move (0: none).")] = 1,
    evaluate_all: Annotated[bool, typer.Option("--evaluate-all", help="Validate every candidate (the Pareto table), "
                                                                      "not only up to the first PASS.")] = False,
    confirm: Annotated[bool, typer.Option("--confirm/--no-confirm", help="Accept a PASS only if it PASSes again on "
                                                                        "fresh seeds (default on).")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing search directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the search record as JSON.")] = False,
) -> None:
    """Per-layer precision over {int4, int8, fp16} under a return budget: candidates from the smallest up, each
    accepted only by the closed-loop verdict; the best PASSing one is saved as OUT/best."""
    from edgeq.search import search as run_search
    from edgeq.search import search_rows_markdown

    def go() -> object:
        loss = parse_loss(max_loss)
        n = parse_episodes(episodes)
        def log(s: str) -> None:
            err_console.print(f"[edgeq] {s}", highlight=False, markup=False)

        return run_search(bundle, out, max_loss=loss, objective=objective, block_size=block_size,
                          rounding=int4_rounding, episodes=n, max_episodes=max_episodes, seed=seed,
                          fp16_layers=fp16_layers, evaluate_all=evaluate_all, confirm=confirm, overwrite=overwrite,
                          int4_input_scaling=int4_input_scaling, int4_input_affine=int4_input_affine,
                          int4_input_split=int4_input_split, int4_hidden_split=int4_hidden_split, log=log)

    result = run_guarded(go)
    if as_json:
        console.print_json(json.dumps(result.to_json(), default=str))
    else:
        console.print(search_rows_markdown(result.rows), highlight=False, markup=False, soft_wrap=True)
        if result.best is not None:
            console.print(f"best: {result.best['name']} ({result.best['label']}), {result.best['file_bytes']} bytes, "
                          f"return ratio {result.best['return_ratio']} → {result.best_bundle}", highlight=False,
                          markup=False)
        else:
            console.print(f"no candidate PASSed: {result.status} (nothing saved as best)", highlight=False,
                          markup=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
