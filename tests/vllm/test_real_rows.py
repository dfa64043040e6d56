"""The rows of real runtimes, earned against live servers in one certified session.

One pytest run with several backends (each its own row, one server at a time), then the
checks each issue's acceptance names: labels, the substrate and lowering evidence, the
bundles verify, and no server process survives.
"""

import json

import pytest

from tests.runtimes import certified_run, processes_for, require_backend

pytestmark = require_backend("vllm", "vllm+rkv")

from pytest_rkv.evidence import bundle_dir  # noqa: E402
from pytest_rkv.verify import verify  # noqa: E402

BACKENDS = ("reference", "vllm", "vllm+rkv")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    report = tmp_path_factory.mktemp("real-rows")
    proc = certified_run(report, BACKENDS)
    rows = {b: json.loads((bundle_dir(report, b) / "row.json").read_text())
            for b in BACKENDS if (bundle_dir(report, b) / "row.json").exists()}
    return {"proc": proc, "report": report, "rows": rows, "leftover": processes_for(report, b"vllm")}


def test_both_rows_come_from_one_run(session):
    assert set(session["rows"]) == set(BACKENDS), session["proc"].stdout[-3000:]
    out = session["proc"].stdout
    assert "reference (pytest-rkv-reference" in out and "vllm (vllm 0.3" in out and "vllm+rkv (vllm 0.3" in out


def test_reference_row_is_native(session):
    assert session["rows"]["reference"]["label"] == "native conformance"


def test_stock_vllm_row_is_approximation_substrate(session):
    row = session["rows"]["vllm"]
    assert row["label"] == "approximation substrate", row["reason"]
    assert row["runtime"] == "vllm" and row["runtime_version"]
    # Stock vLLM has no host tier on CPU (vllm+lmcache adds one): that substrate is unsupported.
    assert {k: v["outcome"] for k, v in row["substrates"].items() if k != "host_tier"} == {
        "prefix_reuse": "passed", "eviction_observable": "passed", "block_events": "passed"}
    assert row["substrates"]["host_tier"]["outcome"] == "unsupported"
    unsupported = [k for k, v in row["obligations"].items() if v["outcome"] == "unsupported"]
    assert "active-refusal" in unsupported and "claim-identity" in unsupported
    assert "claim-isolation" in unsupported  # no tenants; cache_salt is not a lowering (vllm.toml)
    assert not [k for k, v in row["obligations"].items() if v["outcome"] in ("passed", "error")]


def test_stock_vllm_evidence_shows_silent_eviction(session):
    row = session["rows"]["vllm"]
    reuse = row["substrates"]["prefix_reuse"]["tests"][0]["evidence"]
    assert reuse["cached_tokens_first"] == 0 and reuse["cached_tokens_again"] == 60 * 32
    eviction = row["substrates"]["eviction_observable"]["tests"][0]["evidence"]
    assert eviction["active_admitted"] is True
    assert eviction["resident_blocks_surviving"] == 10
    assert eviction["blocks_evicted_by_active"] >= 50


def test_priority_lowering_is_contradicted_on_vllm(session):
    probe = session["rows"]["vllm"]["lowerings"]["priority-as-hard-claim"]
    assert probe["outcome"] == "failed"
    evidence = probe["tests"][0]["evidence"]
    assert evidence["active_admitted"] is True and evidence["resident_blocks_surviving"] < 60


def test_vllm_with_the_adapter_is_adapter_scoped(session):
    row = session["rows"]["vllm+rkv"]
    assert row["label"] == "adapter-scoped evidence", row["reason"]
    assert row["depth"] == "adapter"
    outside = {k: v for k, v in row["obligations"].items() if v["outcome"] != "passed"}
    assert set(outside) == {"demotion-restore", "placement"}, outside
    assert outside["demotion-restore"]["outcome"] == "unsupported"  # no host tier (vllm+rkv+lmcache has one)
    isolation = {t["nodeid"].split("::")[-1].split("[")[0] for t in row["obligations"]["claim-isolation"]["tests"]}
    assert len(isolation) == 4, isolation  # tenants A and B, through bearer tokens


def test_adapter_refuses_the_canonical_probe_and_keeps_the_claim(session):
    test = session["rows"]["vllm+rkv"]["obligations"]["active-refusal"]["tests"]
    canonical = next(t for t in test if "canonical" in t["nodeid"])
    evidence = canonical["evidence"]
    assert evidence["active_status"] == 409
    refusal = evidence["refusal"]
    assert refusal["type"] == "active_refusal" and len(refusal["blocking_claims"]) == 1
    assert refusal["claimed_blocks"] == {refusal["blocking_claims"][0]: 60}
    assert evidence["resident_cached_tokens_after"] == 60 * 32


def test_adapter_event_log_orders_acceptance_materialization_and_refusal(session):
    trace = [json.loads(line) for line in
             (bundle_dir(session["report"], "vllm+rkv") / "events.jsonl").read_text().splitlines()]
    canonical = [e for e in trace if "test_canonical_probe" in e["test"]]
    kinds = [e["type"] for e in canonical]
    accepted, materialized, refused = (kinds.index(k) for k in ("claim.accepted", "claim.materialized", "request.refused"))
    assert accepted < materialized < refused
    seqs = [e["seq"] for e in canonical]
    assert seqs == sorted(set(seqs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bundles_verify(session, backend):
    failed = [c.line() for c in verify(bundle_dir(session["report"], backend)) if not c.ok]
    assert not failed


def test_no_vllm_process_survives_the_run(session):
    assert not session["leftover"]
