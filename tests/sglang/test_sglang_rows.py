"""The `sglang` row, earned against a live SGLang server in one certified session.

Skipped (tests/runtimes.py) when SGLang's venv is absent (`bash scripts/setup_sglang.sh` makes it). One run,
then the checks the issue's acceptance names: the label, the canonical probe's evidence
(the resident silently evicted), the streaming-session probe with its bounded wait, the
declared stand-ins, the run-backed descriptor, the bundle verifying, no process left.
"""

import json
import subprocess
import sys

import pytest

from tests.runtimes import require_backend

pytestmark = require_backend("sglang")

from pytest_rkv.evidence import bundle_dir  # noqa: E402
from pytest_rkv.verify import verify  # noqa: E402
from tests.conftest import SUITES  # noqa: E402
from tests.sglang.test_sglang_lifecycle import run_processes  # noqa: E402

REPO = SUITES.parent
PAGE = 16


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    report = tmp_path_factory.mktemp("sglang-row")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITES), "--rkv-certify", "--rkv-backend=sglang",
         "--rkv-startup-timeout=900", "--rkv-report-dir", str(report), "-p", "no:cacheprovider", "-q"],
        capture_output=True, text=True, timeout=1800,
    )
    path = bundle_dir(report, "sglang") / "row.json"
    row = json.loads(path.read_text()) if path.exists() else None
    return {"proc": proc, "report": report, "row": row,
            "leftover": run_processes(bundle_dir(report, "sglang").resolve())}


def _evidence(row, section, key):
    return row[section][key]["tests"][0]["evidence"]


def test_sglang_row_is_approximation_substrate(session):
    row = session["row"]
    assert row is not None, session["proc"].stdout[-3000:]
    assert row["label"] == "approximation substrate", row["reason"]
    assert row["runtime"] == "sglang" and row["runtime_version"] == "0.5.23"
    assert {k: v["outcome"] for k, v in row["substrates"].items()} == {
        "prefix_reuse": "passed", "eviction_observable": "passed", "block_events": "passed",
        "host_tier": "unsupported"}, row["substrates"]  # HiCache is not switched on
    unsupported = [k for k, v in row["obligations"].items() if v["outcome"] == "unsupported"]
    assert "active-refusal" in unsupported and "claim-identity" in unsupported
    assert not [k for k, v in row["obligations"].items() if v["outcome"] in ("passed", "error")]


def test_canonical_probe_shows_the_resident_silently_evicted(session):
    row = session["row"]
    reuse = _evidence(row, "substrates", "prefix_reuse")
    assert reuse["cached_tokens_first"] == 0 and reuse["cached_tokens_again"] == 60 * PAGE  # exact
    eviction = _evidence(row, "substrates", "eviction_observable")
    assert eviction["active_admitted"] is True
    assert eviction["resident_blocks_surviving"] == 0
    assert eviction["blocks_evicted_by_active"] >= 60


def test_streaming_session_waits_without_refusal_and_hides_its_blocks(session):
    probe = session["row"]["lowerings"]["streaming-session-as-hard-claim"]
    assert probe["outcome"] == "failed"
    evidence = probe["tests"][0]["evidence"]
    assert evidence["active_waited_s"] >= evidence["bounded_wait_s"] > 0  # the whole bounded wait
    assert evidence["active_admitted"] is False and evidence["active_error"] is None
    assert evidence["session_blocks_stored_in_events"] == 0


def test_priority_with_priority_eviction_is_no_hard_claim(session):
    probe = session["row"]["lowerings"]["priority-as-hard-claim"]
    assert probe["outcome"] == "failed"
    evidence = probe["tests"][0]["evidence"]
    assert evidence["active_admitted"] is True and evidence["resident_blocks_surviving"] < 60


def test_row_declares_its_stand_ins_and_no_kernel_was_called(session):
    details = session["row"]["runtime_details"]
    assert details["stand_ins"][0].startswith("sgl_kernel: pytest-rkv's import-only stand-in")
    assert details["distribution"]["name"] == "sglang" and details["distribution"]["files_sha256"]
    assert details["sgl_kernel_calls"] == []
    assert details["geometry"] == {"max_total_num_tokens": 80 * PAGE, "page_size": PAGE}


def test_descriptors_are_labelled_from_the_run(session):
    out = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "check", "--all", str(REPO / "backends"),
                          "--evidence-dir", str(session["report"])], capture_output=True, text=True, cwd=REPO)
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("sglang")}
    assert " run " in f" {lines['sglang']} " and lines["sglang"].rstrip().endswith("approximation substrate"), out.stdout
    assert lines["sglang-session-hard-claim"].rstrip().endswith("rejected mapping"), out.stdout


def test_bundle_verifies(session):
    failed = [c.line() for c in verify(bundle_dir(session["report"], "sglang")) if not c.ok]
    assert not failed


def test_no_sglang_process_survives_the_run(session):
    assert not session["leftover"]
