"""The `dynamo` row, earned against a live Dynamo deployment in one certified run: the
placement obligation runs (routed backend), routing evidence is recorded per worker, the
KV-routing-as-placement lowering is contradicted by the run, and nothing is left behind."""

from __future__ import annotations

import json

import pytest

from pytest_rkv.evidence import bundle_dir
from pytest_rkv.verify import verify
from pytest_rkv.checker import check_file
from tests.conftest import SUITES
from tests.runtimes import certified_run, processes_for, require_backend

pytestmark = require_backend("dynamo")

REPO = SUITES.parent


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    report = tmp_path_factory.mktemp("dynamo-row")
    proc = certified_run(report, ["dynamo"], "--rkv-startup-timeout", "600")
    row_path = bundle_dir(report, "dynamo") / "row.json"
    assert row_path.exists(), proc.stdout[-4000:] + proc.stderr[-2000:]
    return {"proc": proc, "report": report, "row": json.loads(row_path.read_text()),
            "leftover": processes_for(report)}


def _lowering(row, probe):
    (test,) = row["lowerings"][probe]["tests"]
    return test


def test_row_is_routed_stock_dynamo(run):
    row = run["row"]
    assert (row["backend"], row["depth"], row["routed"], row["certified"]) == ("dynamo", "none", True, True)
    assert row["label"] == "approximation substrate"
    details = row["runtime_details"]
    assert details["runtime_version"] == "1.6.1" and details["workers"] == 2 and len(set(details["worker_ids"])) == 2


def test_placement_ran_and_is_unsupported_not_inapplicable(run):
    placement = run["row"]["obligations"]["placement"]
    assert placement["outcome"] == "unsupported", placement
    assert "no claim API" in placement["tests"][0]["detail"]


def test_single_pool_substrates_pass_on_the_home_worker(run):
    assert {k: v["outcome"] for k, v in run["row"]["substrates"].items()} == {
        "prefix_reuse": "passed", "eviction_observable": "passed", "block_events": "passed",
        "host_tier": "unsupported"}  # the mocker is run without its host tier


def test_routing_is_recorded_per_worker_and_contradicts_placement(run):
    test = _lowering(run["row"], "kv-routing-as-placement")
    ev = test["evidence"]
    home = ev["placed_on"]
    assert test["outcome"] == "failed" and "lowering contradicted" in test["detail"]
    assert sorted(ev["blocks_stored_per_worker"].values()) == [0, 60] and ev["blocks_stored_per_worker"][home] == 60
    assert ev["routed_reuse_before_pressure"] == [
        {"worker": home, "cached_tokens": 960, "kv_hit_rate": pytest.approx(960 / 976)}] * 3
    after = ev["routed_reuse_after_pressure"]
    assert after["active_admitted"] is True and after["blocks_evicted_on_home"] == 50
    assert after["cached_tokens"] < 960


def test_agent_priority_is_no_hard_claim(run):
    test = _lowering(run["row"], "priority-as-hard-claim")
    assert test["outcome"] == "failed"
    assert test["evidence"]["resident_blocks_surviving"] == 10 and test["evidence"]["active_admitted"] is True


def test_checker_rejects_routing_as_placement_from_the_run(run):
    result = check_file(REPO / "backends" / "dynamo" / "dynamo-routing-placement.toml", evidence_dir=run["report"])
    assert result.evidence == "run"
    assert result.obligations["placement"].label.value == "rejected mapping", result.obligations["placement"]


def test_bundle_verifies(run):
    failed = [c.line() for c in verify(bundle_dir(run["report"], "dynamo")) if not c.ok]
    assert not failed


def test_nothing_survives_the_run(run):
    assert run["leftover"] == []
