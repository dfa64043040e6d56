"""The `vllm+rkv+lmcache` row: the claims adapter with LMCache as its host tier, earned
against live servers in one certified session, then judged: every single-engine obligation
in the adapter's scope passed (demotion and restore included), restore before reuse in the
trace, the restore failure scoped to its claim, the descriptor checked against the run, the
bundle verifies, and no process left behind.
"""

import json

import pytest

from tests.runtimes import certified_run, processes_for, require_backend

pytestmark = require_backend("vllm+rkv+lmcache")

from pytest_rkv.checker import check_file  # noqa: E402
from pytest_rkv.contract import Label  # noqa: E402
from pytest_rkv.evidence import bundle_dir  # noqa: E402
from pytest_rkv.verify import verify  # noqa: E402
from tests.conftest import SUITES  # noqa: E402

BACKEND = "vllm+rkv+lmcache"
DESCRIPTOR = SUITES.parent / "backends" / "vllm-rkv-lmcache" / "vllm-rkv-lmcache.toml"
SINGLE_ENGINE = {
    "claim-identity", "materialization-predicate", "ordered-lifecycle", "active-refusal", "soft-harm",
    "write-no-admit", "materialization-failure", "demotion-restore", "expiry", "release",
    "reuse-attribution", "trace-reconstruction", "claim-isolation",
}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    report = tmp_path_factory.mktemp("rkv-lmcache-row")
    proc = certified_run(report, [BACKEND], "--rkv-startup-timeout", "900", timeout=2400)
    bundle = bundle_dir(report, BACKEND)
    row = json.loads((bundle / "row.json").read_text()) if (bundle / "row.json").exists() else None
    events = [json.loads(line) for line in (bundle / "events.jsonl").read_text().splitlines()] \
        if (bundle / "events.jsonl").exists() else []
    return {"proc": proc, "report": report, "row": row, "events": events,
            "leftover": processes_for(report, b"vllm", b"lmcache", b"VLLM")}


def _tests(row: dict, obligation: str) -> dict[str, str]:
    return {t["nodeid"].split("::")[-1].split("[")[0]: t["outcome"] for t in row["obligations"][obligation]["tests"]}


def test_every_single_engine_obligation_in_scope_passed_at_adapter_depth(session):
    row = session["row"]
    assert row is not None, session["proc"].stdout[-3000:]
    assert row["label"] == "adapter-scoped evidence", row["reason"]
    assert row["depth"] == "adapter"
    outcomes = {ob: row["obligations"][ob]["outcome"] for ob in SINGLE_ENGINE}
    assert set(outcomes.values()) == {"passed"}, outcomes  # nothing declared unsupported
    details = row["runtime_details"]
    assert details["tier_attached_instances"], "vLLM's connector never registered with the tier"
    assert details["demotion"] == "to the host tier (LMCache)"
    argv = details["tier_server_argv"]
    assert argv[argv.index("--chunk-size") + 1] == "32", "the tier's chunk must be vLLM's block"


def test_demotion_restores_before_reuse_and_a_failed_restore_is_the_claim_s(session):
    row = session["row"]
    assert set(_tests(row, "demotion-restore").values()) == {"passed"}, _tests(row, "demotion-restore")
    failures = _tests(row, "materialization-failure")
    assert failures["test_failed_restore_is_not_reported_as_reuse"] == "passed", failures
    assert failures["test_restore_failure_armed_for_one_claim_spares_the_others"] == "passed", failures
    # In the recorded trace (numbered per test: each test starts from a reset), every
    # restore precedes the reuse of its claim by the same request.
    def key(e: dict) -> tuple:
        return e["test"], e["claim_id"], e["request_id"]

    restored = {key(e): e["seq"] for e in session["events"] if e["type"] == "claim.restored"}
    assert restored, "the trace holds no claim.restored"
    for k, seq in restored.items():
        reused = [e["seq"] for e in session["events"] if e["type"] == "claim.reused" and key(e) == k]
        assert reused and min(reused) > seq, (k, seq, reused)
    assert any(e["type"] == "claim.restore_failed" and e.get("tier") == "host" for e in session["events"])


def test_the_descriptor_holds_against_the_run(session):
    check = check_file(DESCRIPTOR, evidence_dir=session["report"])
    assert check.evidence == "run"
    assert check.label == Label.ADAPTER, check.reason
    assert check.obligations["demotion-restore"].label == Label.ADAPTER, check.obligations["demotion-restore"].reason


def test_the_bundle_verifies(session):
    failed = [c.line() for c in verify(bundle_dir(session["report"], BACKEND)) if not c.ok]
    assert not failed


def test_no_lmcache_or_vllm_process_survives_the_run(session):
    assert not session["leftover"]
