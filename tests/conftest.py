"""Shared fixtures: the trained policies in tests/fixtures and SB3 models built (not trained) per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

FIXTURES = Path(__file__).parent / "fixtures"
POLICIES = FIXTURES / "policies"
SB3_1X = FIXTURES / "sb3-1x" / "sb3-1x-ppo-Pendulum-v1.zip"


#: ``--set`` flags for a quantize whose test is about something other than the int8 search (envs, ingest,
#: messages, bundle files, validation plumbing): config version 1's search, one per-layer search from the
#: recipe's start without the AffineQuant input or outlier splitting, about a third of the default's planning
#: time. The defaults themselves are tested by test_auto_choice.py, test_affine_input.py, test_outlier_split.py,
#: test_default_keeps_return.py, test_fixture_returns.py and test_cli.py.
QUICK_PLAN = ("--set", "quantization.auto_starts=recipe", "--set", "quantization.affine_input=false",
              "--set", "quantization.split_outliers=0")
#: ``--set`` flags for the validation extras a test does not read: one noise-floor draw, no per-layer error, a
#: short latency measurement
QUICK_MEASURE = ("--set", "validation.floor_draws=1", "--set", "validation.per_layer=false",
                 "--set", "validation.latency_calls=200")
#: :data:`QUICK_PLAN` as ``edgeq.quantize(..., overrides=QUICK_OVERRIDES)``
QUICK_OVERRIDES = {"quantization.auto_starts": "recipe", "quantization.affine_input": False,
                   "quantization.split_outliers": 0.0}


def policy_fixture(name: str) -> Path:
    path = POLICIES / f"{name}.zip"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train it with scripts/train_fixtures.py {name}")
    return path


#: Fixtures that run a whole quantize / validate (closed-loop episodes, report): tests using them
#: are marked ``slow``, so ``python -m pytest -q -m "not slow"`` is a fast subset (README).
SLOW_FIXTURES = frozenset({"pendulum_bundle", "piped_run", "zoo_bundle", "bundles", "validated", "bundle",
                           "serial_run", "rppo_pendulum"})


#: The longest test files (seconds on 2 cores, `--durations`), longest first. They are collected first, so
#: ``pytest -n 2 --dist loadfile`` hands them out first and fills the end of the run with short files instead
#: of leaving one worker idle while the other runs a long file that happened to sort last (a scheduling
#: order only: which tests run, and what they assert, does not change).
LONGEST_FILES = ("test_cli.py", "test_history_pipeline.py", "test_fixture_returns.py", "test_cli_messages.py",
                 "test_fuzz_inputs.py", "test_rl_zoo.py", "test_perturb_validation.py", "test_default_keeps_return.py",
                 "test_crash_safety.py", "test_executor.py", "test_cuda_target.py", "test_falls_verdict.py",
                 "test_custom_env.py", "test_wheel.py", "test_fused_mlp.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(scope="session")
def sac_pendulum() -> Path:
    return policy_fixture("sac-pendulum")


@pytest.fixture(scope="session")
def sac_halfcheetah() -> Path:
    return policy_fixture("sac-halfcheetah")


@pytest.fixture(scope="session")
def sb3_1x_ppo() -> Path:
    return SB3_1X
