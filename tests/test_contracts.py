"""The typed records (edgeq.deploy.contracts) match docs/bundle-format.md and the bundles edgeq wrote; the
validation report is one function per section."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgeq.deploy.contracts import (
    Decision,
    DecisionTarget,
    Manifest,
    PairedDifference,
    SideResult,
    TargetResult,
    ValidationResult,
)

ROOT = Path(__file__).resolve().parent.parent
BUNDLES = Path(__file__).parent / "fixtures" / "bundles"


def _keys(td: Any) -> set[str]:
    return set(td.__annotations__)


def _required(td: Any) -> set[str]:
    # annotations are strings at run time (the robot side evaluates none): Required[...] marks the required keys
    return {k for k, v in td.__annotations__.items() if "Required[" in str(v)}


def check_manifest_contract(manifest: dict[str, Any]) -> None:
    assert set(manifest) <= _keys(Manifest), set(manifest) - _keys(Manifest)
    assert _required(Manifest) <= set(manifest), _required(Manifest) - set(manifest)
    if "decision" in manifest:
        d = manifest["decision"]
        assert set(d) <= _keys(Decision) and _required(Decision) <= set(d)
        for rec in d["targets"].values():
            assert set(rec) <= _keys(DecisionTarget), set(rec) - _keys(DecisionTarget)


def check_validation_contract(val: dict[str, Any]) -> None:
    assert set(val) <= _keys(ValidationResult), set(val) - _keys(ValidationResult)
    for r in [*val["targets"].values(), *([val["all_int8_cpu"]] if "all_int8_cpu" in val else [])]:
        assert set(r) <= _keys(TargetResult), set(r) - _keys(TargetResult)
        if "float" in r:
            for side in (r["float"], r["int8"]):
                assert set(side) <= _keys(SideResult) and _required(SideResult) <= set(side)
            assert set(r["paired_difference"]) <= _keys(PairedDifference)


def test_manifest_type_lists_the_documented_fields() -> None:
    doc = (ROOT / "docs" / "bundle-format.md").read_text()
    table = doc[doc.index("## manifest.json"):doc.index("### The decision")]
    documented = set()
    for row in re.findall(r"^\| (`[^|]+) \|", table, flags=re.M):
        documented |= {name.split(".")[0] for name in re.findall(r"`([a-z0-9_.]+)`", row)}
    assert documented == _keys(Manifest), (documented ^ _keys(Manifest))
    # the robot reads these: required in the type as in the document
    assert {"format_version", "files", "observation_space", "action_space", "io", "models"} <= _required(Manifest)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_committed_bundles_fit_the_contracts(version: str) -> None:
    bundle = BUNDLES / version / "sac-pendulum"
    check_manifest_contract(json.loads((bundle / "manifest.json").read_text()))
    check_validation_contract(json.loads((bundle / "validation.json").read_text()))


def test_decision_record_is_typed_and_ordered() -> None:
    from edgeq.validate.validator import decision_record

    val = json.loads((BUNDLES / "v2" / "sac-pendulum" / "validation.json").read_text())
    record = decision_record(val)
    assert list(record) == ["status", "exit_code", "procedure", "tolerance", "failure_rule", "targets"]
    cpu = record["targets"]["cpu"]
    assert list(cpu) == list(DecisionTarget.__annotations__)
    assert cpu["status"] == val["targets"]["cpu"]["verdict"]["status"] and cpu["returns"]["status"] is not None
    check_manifest_contract({**json.loads((BUNDLES / "v2" / "sac-pendulum" / "manifest.json").read_text()),
                             "decision": record})


def test_report_is_one_function_per_section() -> None:
    from edgeq.validate import report

    bundle = BUNDLES / "v2" / "sac-pendulum"
    val = json.loads((bundle / "validation.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    titles = [s.title for s in report.validation_sections(val, manifest)]
    assert titles[0] == "Verdict" and titles[-1] == "Settings"
    assert len(titles) == len(set(titles))
    for section in report.VALIDATION_SECTIONS:  # each section alone, in the order of the report
        got = section(val, manifest)
        assert got is None or got.title in titles
    # a section with nothing to show is left out, not an empty heading
    assert report._sensitivity_section({**val, "sensitivity": None}, manifest) is None
    assert report._layers_section(val, None) is None
    assert report._per_layer_section({**val, "per_layer": None}, manifest) is None
