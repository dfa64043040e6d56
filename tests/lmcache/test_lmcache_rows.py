"""The `vllm+lmcache` row, earned against live servers (LMCache's MP cache server and vLLM
with its connector) in one certified session, then judged: label, the tier's substrate
evidence, the lowering probes and what the checker makes of them, the bundle, and no
process left behind.
"""

import json

import pytest

from tests.runtimes import certified_run, processes_for, require_backend

pytestmark = require_backend("vllm+lmcache")

from pytest_rkv.evidence import bundle_dir  # noqa: E402
from pytest_rkv.verify import verify  # noqa: E402
from pytest_rkv.checker import check_file  # noqa: E402
from pytest_rkv.contract import Label  # noqa: E402
from tests.conftest import SUITES  # noqa: E402

BACKEND = "vllm+lmcache"
DESCRIPTORS = SUITES.parent / "backends" / "vllm-lmcache"
BLOCK = 32


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    report = tmp_path_factory.mktemp("lmcache-row")
    proc = certified_run(report, [BACKEND], "--rkv-startup-timeout", "900", timeout=2400)
    row_path = bundle_dir(report, BACKEND) / "row.json"
    row = json.loads(row_path.read_text()) if row_path.exists() else None
    return {"proc": proc, "report": report, "row": row, "leftover": processes_for(report, b"vllm", b"lmcache", b"VLLM")}


def _evidence(section: dict, name: str) -> dict:
    return section[name]["tests"][0]["evidence"]


def test_the_row_is_an_approximation_substrate_with_the_tier_attached(session):
    row = session["row"]
    assert row is not None, session["proc"].stdout[-3000:]
    assert row["label"] == "approximation substrate", row["reason"]
    assert row["depth"] == "none"
    details = row["runtime_details"]
    assert details["lmcache_version"] == "0.5.6"
    assert details["tier_attached_instances"], "vLLM's connector never registered with the tier"
    assert details["geometry_verified_by"]
    assert "LMCacheMPConnector" in " ".join(details["server_argv"])


def test_the_tier_is_a_substrate_with_its_evidence(session):
    substrates = session["row"]["substrates"]
    assert {k: v["outcome"] for k, v in substrates.items()} == {
        "prefix_reuse": "passed", "eviction_observable": "passed", "block_events": "passed", "host_tier": "passed"}
    tier = _evidence(substrates, "host_tier")
    assert tier["host_hashes_stored"] > 0
    assert tier["device_blocks_evicted"] > 0
    # The device pool alone keeps at most 80 - 70 = 10 blocks of the resident; the tier more.
    assert tier["device_room_tokens"] == 10 * BLOCK
    assert 10 * BLOCK < tier["cached_tokens_again"] <= 60 * BLOCK
    external = tier["cached_by_source_delta"]['vllm:prompt_tokens_cached_by_source_total{source="external_unspecified"}']
    assert external > 0 and external == tier["cached_tokens_again"] - tier["cached_by_source_delta"][
        'vllm:prompt_tokens_cached_by_source_total{source="device"}']


def test_lowering_probes_measure_the_tier_and_the_checker_rejects_them(session):
    lowerings = session["row"]["lowerings"]
    for probe in ("host-tier-as-demotion", "host-tier-as-hard-claim"):
        assert lowerings[probe]["outcome"] == "failed", lowerings[probe]
        evidence = _evidence(lowerings, probe)
        assert evidence["active_admitted"] is True
        assert 10 < evidence["resident_blocks_served_again"] < 60
    check = check_file(DESCRIPTORS / "vllm-lmcache-tier-claims.toml", evidence_dir=session["report"])
    assert check.evidence == "run"
    for obligation in ("demotion-restore", "active-refusal"):
        assert check.obligations[obligation].label == Label.REJECTED, check.obligations[obligation].reason
    honest = check_file(DESCRIPTORS / "vllm-lmcache.toml", evidence_dir=session["report"])
    assert honest.label == Label.APPROXIMATION, honest.reason


def test_the_bundle_verifies(session):
    failed = [c.line() for c in verify(bundle_dir(session["report"], BACKEND)) if not c.ok]
    assert not failed


def test_no_lmcache_or_vllm_process_survives_the_run(session):
    assert not session["leftover"]
