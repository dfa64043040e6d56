"""The lowering checker on real evidence: the reference suite run, the committed vLLM run,
the static rows, `rkv check`, and the individual fail-closed rules."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_rkv.contract import Label
from pytest_rkv.descriptor import (
    Evidence,
    SuiteCatalogue,
    descriptor_files,
    load_descriptor,
    load_evidence,
    parse_descriptor,
)
from pytest_rkv.checker import check_data, check_file, check_lowering
from tests.conftest import recorded_catalogue

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ROOT / "backends"
REFERENCE = BACKENDS / "reference" / "reference.toml"
VLLM_RUN = Path(__file__).resolve().parent / "bad_lowerings" / "priority-as-hard-claim"  # a real vLLM 0.32 run
CATALOGUE = SuiteCatalogue.scan(ROOT / "suites")
POSITIVE = (Label.NATIVE, Label.ADAPTER)


def run_reference(report: Path, *extra: str) -> Path:
    subprocess.run([sys.executable, "-m", "pytest", "suites", "--rkv-backend=reference", "--rkv-report-dir",
                    str(report), "-q", "-p", "no:cacheprovider", *extra], capture_output=True, text=True, cwd=ROOT)
    bundle = report / "reference"
    assert (bundle / "row.json").is_file() and (bundle / "events.jsonl").is_file()
    return bundle


@pytest.fixture(scope="module")
def reference_bundle(tmp_path_factory):
    return run_reference(tmp_path_factory.mktemp("ref"))


def check(descriptor_path: Path, evidence: Evidence | None = None):
    return check_file(descriptor_path, evidence or Evidence(), catalogue=CATALOGUE, source_root=None)


# -- the reference row ----------------------------------------------------------------------


def test_reference_is_native_with_its_run_evidence(reference_bundle):
    result = check(REFERENCE, load_evidence(reference_bundle / "row.json"))
    assert result.label == Label.NATIVE, result.reason
    assert result.evidence == "run"
    assert result.obligations.pop("placement").label is None
    for ob_id, c in result.obligations.items():
        assert c.label == Label.NATIVE and c.codes == ("confirmed",), (ob_id, c.reason)


def test_reference_without_its_trace_is_not_native(reference_bundle, tmp_path):
    shutil.copy(reference_bundle / "row.json", tmp_path / "row.json")
    result = check(REFERENCE, load_evidence(tmp_path / "row.json"))
    assert result.label == Label.APPROXIMATION
    assert result.obligations["ordered-lifecycle"].codes[0] == "missing-order"
    assert result.obligations["expiry"].codes[0] == "missing-identity"
    assert all(c.label not in POSITIVE for c in result.obligations.values())


def test_reference_row_broken_by_a_fault_is_a_rejected_mapping(tmp_path):
    bundle = run_reference(tmp_path, "--rkv-reference-fault=events_out_of_order")
    result = check(REFERENCE, load_evidence(bundle / "row.json"))
    assert result.label == Label.REJECTED
    ordered = result.obligations["ordered-lifecycle"]
    assert ordered.label == Label.REJECTED and ordered.codes[0] == "contradicted"
    assert "test_lifecycle_events_are_numbered_and_follow_the_state_machine failed" in ordered.reason


def test_rkv_check_reference_with_evidence_exits_zero(reference_bundle):
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "check", str(REFERENCE),
                           "--evidence", str(reference_bundle / "row.json")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().splitlines()[-1].startswith("row: NATIVE CONFORMANCE")


# -- vLLM: the stock row and the tempting priority row, on a real vLLM 0.32 run -------------------


def test_priority_as_hard_claim_is_rejected_once_the_vllm_suite_has_run():
    row = json.loads((VLLM_RUN / "row.json").read_text())
    assert row["backend"] == "vllm" and row["lowerings"]["priority-as-hard-claim"]["outcome"] == "failed"
    result = check(BACKENDS / "vllm" / "vllm-priority-hard-claim.toml", load_evidence(VLLM_RUN / "row.json"))
    assert result.label == Label.REJECTED
    assert result.obligations["active-refusal"].label == Label.REJECTED


def test_priority_row_without_evidence_is_only_approximation():
    result = check(BACKENDS / "vllm" / "vllm-priority-hard-claim.toml")
    assert result.obligations["active-refusal"].label == Label.APPROXIMATION
    assert result.obligations["active-refusal"].codes[0] == "static-only"


def test_stock_vllm_row_is_approximation_on_the_same_run():
    # Judged against the suite it was recorded with: tests added since would read as not
    # run, and a test the row lacks leaves the obligation unknown (run_label).
    recorded = recorded_catalogue(json.loads((VLLM_RUN / "row.json").read_text()))
    result = check_file(BACKENDS / "vllm" / "vllm.toml", load_evidence(VLLM_RUN / "row.json"), catalogue=recorded,
                        source_root=None)
    assert result.label == Label.APPROXIMATION, result.reason
    labels = {ob: c.label for ob, c in result.obligations.items()}
    assert Label.REJECTED not in labels.values() and not set(labels.values()) & set(POSITIVE)
    assert labels["ordered-lifecycle"] == Label.APPROXIMATION  # block events with seq: a substrate
    assert labels["expiry"] == Label.UNKNOWN  # no TTL at all


# -- static rows ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", descriptor_files(BACKENDS), ids=lambda p: p.name)
def test_static_rows_are_never_above_approximation(path):
    result = check(path)
    assert result.evidence == "static"
    assert result.label in (Label.APPROXIMATION, Label.UNKNOWN)
    for ob_id, c in result.obligations.items():
        assert c.label in (None, Label.APPROXIMATION, Label.UNKNOWN), (ob_id, c.reason)


def test_unpinned_source_anchors_do_not_count():
    result = check(BACKENDS / "tensorrt-llm" / "tensorrt-llm.toml")
    refusal = result.obligations["active-refusal"]
    assert refusal.label == Label.UNKNOWN
    assert "is not pinned" in refusal.reason
    assert result.obligations["expiry"].label == Label.APPROXIMATION  # pinned at a commit


def test_routed_rows_have_placement_and_others_do_not():
    assert check(BACKENDS / "dynamo" / "dynamo.toml").obligations["placement"].label == Label.APPROXIMATION
    assert check(BACKENDS / "sglang" / "sglang.toml").obligations["placement"].label is None


# -- rkv check --all ---------------------------------------------------------------------------


def _rkv_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "check", *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_rkv_check_all_prints_the_static_matrix():
    proc = _rkv_check("--all", "backends/")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[1:] if line and not line.startswith(("columns:", "cells:"))}
    assert {"reference", "vllm", "vllm-priority-hard-claim", "sglang", "tensorrt-llm", "dynamo"} <= set(rows)
    assert len(rows) == len(descriptor_files(BACKENDS))
    assert all(" static " in line for line in rows.values())
    assert "rejected" not in proc.stdout.split("columns:")[0].replace("R rejected", "")


def test_rkv_check_all_uses_evidence_found_in_the_evidence_dir(reference_bundle, tmp_path):
    evidence = tmp_path / "evidence"
    shutil.copytree(reference_bundle, evidence / "reference")
    shutil.copytree(VLLM_RUN, evidence / "vllm")
    proc = _rkv_check("--all", "backends/", "--evidence-dir", str(evidence))
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    assert rows["reference"].split()[1] == "run" and rows["reference"].endswith("native conformance")
    assert rows["vllm-priority-hard-claim"].endswith("rejected mapping")
    assert rows["vllm"].endswith("approximation substrate")
    assert rows["sglang"].split()[1] == "static"


def test_rkv_check_all_flags_a_malformed_descriptor_in_the_matrix(tmp_path):
    shutil.copytree(BACKENDS, tmp_path / "backends")
    (tmp_path / "backends" / "broken.toml").write_text('schema = "pytest-rkv/descriptor/1"\nbackend = 3\n')
    proc = _rkv_check("--all", str(tmp_path / "backends"))
    assert proc.returncode == 2
    assert "broken" in proc.stdout and "MALFORMED" in proc.stdout
    assert proc.stderr.count("\n") == 1 and "broken.toml: backend: input should be a valid string" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_evidence_is_found_under_the_canonical_backend_id(reference_bundle, tmp_path):
    from pytest_rkv.descriptor import evidence_for

    shutil.copytree(reference_bundle, tmp_path / "vllm+rkv")
    descriptor = parse_descriptor({"schema": "pytest-rkv/descriptor/1", "backend": "vllm+rkv",
                                   "runtime": {"name": "vllm", "version": "0.32.0"}})
    assert evidence_for(descriptor, tmp_path).row_path == str(tmp_path / "vllm+rkv" / "row.json")
    assert not evidence_for(descriptor, tmp_path / "nowhere").has_run


def test_rkv_check_needs_a_descriptor_or_all():
    proc = _rkv_check()
    assert proc.returncode == 2 and "name a DESCRIPTOR, or --all DIR" in proc.stderr


# -- single rules, on small hand-made evidence ------------------------------------------------

DESCRIPTOR = {
    "schema": "pytest-rkv/descriptor/1", "backend": "x",
    "runtime": {"name": "x", "version": "1", "commit": "v1"},
    "surfaces": {"api": {"kind": "claim-api", "summary": "claims", "anchors": ["source:src/api.py"]}},
    "lowerings": {"release": {"surface": "api", "depth": "native", "proposed": "native conformance",
                              "anchors": ["test:suites/test_claims.py::test_release_ends_protection_at_once"]}},
}
RELEASE = "suites/test_claims.py::test_release_ends_protection_at_once[x]"
RELEASE_SOFT = "suites/test_claims.py::test_released_soft_claim_is_never_harmed[x]"


def release_row(outcome: str, events: list[dict], depth: str = "native", **entry) -> dict:
    from pytest_rkv.evidence import events_digest

    test = {"nodeid": RELEASE, "outcome": outcome, "detail": "", "evidence": {}, "events": len(events), **entry}
    if events:
        test["events_sha256"] = events_digest(events)
    # the suite's other release test, passed, with no trace of its own
    other = {"nodeid": RELEASE_SOFT, "outcome": "passed", "detail": "", "evidence": {}, "events": 0}
    return {"schema": "pytest-rkv/row/2", "backend": "x", "depth": depth, "routed": False,
            "obligations": {"release": {"outcome": outcome, "tests": [test, other]}}, "substrates": {}, "lowerings": {}}


def lifecycle(*steps: tuple[str, str | None, str]) -> list[dict]:
    from pytest_rkv.contract import Event

    return [Event(seq=i, ts=float(i), type=t, claim_id="c1", from_state=f, to_state=to).model_dump(mode="json")
            for i, (t, f, to) in enumerate(steps, 1)]


GOOD = lifecycle(("claim.accepted", None, "accepted"), ("claim.materialized", "accepted", "resident"),
                 ("claim.released", "resident", "released"))


def evidence(row: dict, events: list[dict] | None) -> Evidence:
    trace = None if events is None else [{**e, "test": RELEASE} for e in events]
    return Evidence(row=row, trace=trace)


def release_check(row: dict, events: list[dict] | None, descriptor: dict = DESCRIPTOR):
    return check_lowering(parse_descriptor(descriptor), evidence(row, events), catalogue=CATALOGUE).obligations["release"]


def test_a_clean_pass_with_anchors_and_trace_is_native():
    c = release_check(release_row("passed", GOOD), GOOD)
    assert (c.label, c.codes) == (Label.NATIVE, ("confirmed",))


def test_a_pass_at_depth_none_is_approximation():
    c = release_check(release_row("passed", GOOD, depth="none"), GOOD)
    assert (c.label, c.codes[0]) == (Label.APPROXIMATION, "no-claim-support")


def test_the_proposal_caps_the_label():
    descriptor = json.loads(json.dumps(DESCRIPTOR))
    descriptor["lowerings"]["release"].update(depth="none", proposed="approximation substrate")
    c = release_check(release_row("passed", GOOD), GOOD, descriptor)
    assert (c.label, c.codes[0]) == (Label.APPROXIMATION, "capped-by-proposal")


def test_a_failure_contradicts_even_next_to_a_harness_error():
    row = release_row("failed", GOOD)
    row["obligations"]["release"]["tests"].append({"nodeid": RELEASE.replace("]", "-2]"), "outcome": "error"})
    c = release_check(row, GOOD)
    assert (c.label, c.codes[0]) == (Label.REJECTED, "contradicted")


def test_a_failure_does_not_reject_an_honest_proposal():
    descriptor = json.loads(json.dumps(DESCRIPTOR))
    descriptor["lowerings"]["release"].update(depth="none", proposed="approximation substrate")
    c = release_check(release_row("failed", GOOD), GOOD, descriptor)
    # not rejected; and no more than the run earned (failed, no related substrate: unknown)
    assert c.label == Label.UNKNOWN and "contradicted" not in c.codes


def test_a_missing_test_is_not_run_and_voids_the_evidence():
    row = release_row("passed", GOOD)
    row["obligations"]["release"]["tests"] = []
    c = release_check(row, GOOD)
    assert (c.label, c.codes[0]) == (Label.UNKNOWN, "harness-error")  # void evidence; anchors never lift it


def test_a_seq_gap_is_missing_order():
    gapped = [GOOD[0], {**GOOD[1], "seq": 3}, {**GOOD[2], "seq": 4}]
    descriptor = json.loads(json.dumps(DESCRIPTOR))
    descriptor["lowerings"] = {"ordered-lifecycle": {
        "surface": "api", "depth": "native", "proposed": "native conformance",
        "anchors": ["test:suites/test_claims.py::test_lifecycle_events_are_numbered_and_follow_the_state_machine"]}}
    nodeid = "suites/test_claims.py::test_lifecycle_events_are_numbered_and_follow_the_state_machine[x]"
    row = release_row("passed", gapped)
    row["obligations"] = {"ordered-lifecycle": {"tests": [{**row["obligations"]["release"]["tests"][0], "nodeid": nodeid}]}}
    ev = Evidence(row=row, trace=[{**e, "test": nodeid} for e in gapped])
    c = check_lowering(parse_descriptor(descriptor), ev, catalogue=recorded_catalogue(row)).obligations["ordered-lifecycle"]
    assert (c.label, c.codes[0]) == (Label.APPROXIMATION, "missing-order")
    assert "jumps from seq 1 to 3" in c.reason


def test_a_trace_line_of_no_test_is_ignored_and_reported():
    ev = evidence(release_row("passed", GOOD), GOOD)
    ev = Evidence(row=ev.row, trace=ev.trace + [None, {"seq": 9}, "junk"])
    result = check_lowering(parse_descriptor(DESCRIPTOR), ev, catalogue=CATALOGUE)
    assert result.obligations["release"].label == Label.NATIVE
    assert any(f.code == "bad-evidence" for f in result.findings)


def test_a_row_that_is_not_a_row_counts_as_no_run():
    result = check_lowering(parse_descriptor(DESCRIPTOR), Evidence(row={"schema": "something else"}),
                            catalogue=CATALOGUE)
    assert result.evidence == "static"
    assert result.obligations["release"].label == Label.APPROXIMATION
    assert any("not a pytest-rkv/row/2 document" in f.text for f in result.findings)


def test_unproposed_obligations_are_at_most_approximation():
    c = check_lowering(parse_descriptor(DESCRIPTOR), evidence(release_row("passed", GOOD), GOOD),
                       catalogue=CATALOGUE).obligations["expiry"]
    assert c.proposed is None and c.label in (Label.APPROXIMATION, Label.UNKNOWN) and "not-proposed" in c.codes


def test_check_data_turns_a_malformed_descriptor_into_an_unknown_row():
    result = check_data({"schema": "nope"}, source="fuzz.toml")
    assert result.label == Label.UNKNOWN and result.malformed
    assert result.reason.startswith("fuzz.toml: ")


def test_committed_descriptors_load():
    for path in descriptor_files(BACKENDS):
        assert load_descriptor(path).runtime.version


def test_an_adapter_row_may_leave_out_what_it_declares_unsupported_but_never_the_core():
    from pytest_rkv.contract import OBLIGATIONS, Label
    from pytest_rkv.checker import Finding, ObligationCheck, lowering_row_label

    def checks(gap: str, proposed: Label | None):
        out = {}
        for ob in OBLIGATIONS:
            if ob.routed_only:
                out[ob.id] = ObligationCheck(ob.id, None, None, None, ())
            elif ob.id == gap:
                out[ob.id] = ObligationCheck(ob.id, Label.UNKNOWN, proposed, None, (Finding("unconfirmed", "x"),))
            else:
                out[ob.id] = ObligationCheck(ob.id, Label.ADAPTER, Label.ADAPTER, "s", (Finding("confirmed", "x"),))
        return out

    unsupported = frozenset({"demotion-restore", "active-refusal"})
    assert lowering_row_label(checks("demotion-restore", Label.UNKNOWN), unsupported)[0] == Label.ADAPTER
    # proposed positively but not shown: the descriptor promised it, so no bounding
    assert lowering_row_label(checks("demotion-restore", Label.ADAPTER), unsupported)[0] == Label.APPROXIMATION
    # the run did not say unsupported (it failed, errored, ...): no bounding
    assert lowering_row_label(checks("demotion-restore", Label.UNKNOWN), frozenset())[0] == Label.APPROXIMATION
    # a core obligation can never be left out
    assert lowering_row_label(checks("active-refusal", Label.UNKNOWN), unsupported)[0] == Label.APPROXIMATION
