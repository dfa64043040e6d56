"""The placement obligation test can fail: a routed pair of reference runtimes (a test-only
backend, registered the way a vendor's is) passes it, and each placement fault fails it.

No routed runtime with claims exists yet (`dynamo` has no claim API), so this is the only
evidence that `test_routed_reuse_names_the_worker_holding_the_claim` tells a correct
placement from a wrong one. The pair is a unit-test stand-in and never earns a row.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SUITES

PAIR_DRIVER = '''
import os
from pytest_rkv.drivers.base import Driver, DriverSettings, Reply
from pytest_rkv.drivers.reference import ReferenceDriver
from pytest_rkv.errors import Unsupported

FAULT = os.environ.get("ROUTED_PAIR_FAULT", "")


class RoutedPairDriver(Driver):
    """Two reference runtimes; a claim is placed on the worker holding fewer claims, a
    request goes to the worker holding a claim on its prefix (else w0)."""
    name = "routed-pair"
    depth = "native"
    routed = True

    def start(self):
        self.workers = {w: ReferenceDriver(self.settings) for w in ("w0", "w1")}
        for d in self.workers.values():
            d.start()
        self.placed = {}  # claim id -> (worker, prompt)
        self.reuses = 0

    def info(self):
        return self.workers["w0"].info().model_copy(update={"routed": True})

    def reset(self):
        for d in self.workers.values():
            d.reset()
        self.placed, self.reuses = {}, 0

    def _where(self, claim_id):
        worker, _ = self.placed[claim_id]
        if FAULT == "moved" and self.reuses:  # re-materialized on the other worker, silently
            return "w1" if worker == "w0" else "w0"
        return worker

    def claim(self, req):
        counts = {w: sum(1 for v, _ in self.placed.values() if v == w) for w in self.workers}
        worker = min(counts, key=lambda w: (counts[w], w))
        reply = self.workers[worker].claim(req)
        if reply.ok:
            self.placed[reply.value.claim_id] = (worker, list(req.prompt_token_ids))
            return Reply(reply.status, value=reply.value.model_copy(update={"worker": worker}))
        return reply

    def get_claim(self, claim_id):
        reply = self.workers[self.placed[claim_id][0]].get_claim(claim_id)
        return Reply(reply.status, value=reply.value.model_copy(update={"worker": self._where(claim_id)}))

    def complete(self, req):
        worker = next((w for w, p in self.placed.values() if list(req.prompt[:len(p)]) == p), "w0")
        reply = self.workers[worker].complete(req)
        if reply.ok and reply.value.rkv and reply.value.rkv.reuse:
            self.reuses += 1
            named = "w1" if (FAULT == "misattribute") == (worker == "w0") else "w0"
            reuse = [r.model_copy(update={"worker": named}) for r in reply.value.rkv.reuse]
            rkv = reply.value.rkv.model_copy(update={"reuse": reuse})
            return Reply(reply.status, value=reply.value.model_copy(update={"rkv": rkv}))
        return reply

    def events(self, after=0):
        raise Unsupported("the pair merges no event streams")
'''


def _run_placement(tmp_path: Path, fault: str) -> dict:
    root = tmp_path / "pair"
    dist = root / "routed_pair-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: routed-pair\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pytest_rkv.backends]\nrouted-pair = routed_pair_driver:RoutedPairDriver\n")
    (root / "routed_pair_driver.py").write_text(textwrap.dedent(PAIR_DRIVER))
    env = {**os.environ, "ROUTED_PAIR_FAULT": fault,
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    report = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "pytest", str(SUITES / "test_reuse_and_trace.py"),
                           "-k", "routed_reuse", "--rkv-backend=routed-pair", "--rkv-report-dir", str(report),
                           "-p", "no:cacheprovider", "-q"], env=env, capture_output=True, text=True, timeout=300)
    rows = list(report.glob("*/row.json"))
    assert rows, proc.stdout[-3000:] + proc.stderr[-2000:]
    (test,) = json.loads(rows[0].read_text())["obligations"]["placement"]["tests"]
    return test


def test_correct_placement_passes(tmp_path):
    test = _run_placement(tmp_path, "")
    assert test["outcome"] == "passed", test["detail"]
    assert test["evidence"]["worker"] == "w0" and len(test["evidence"]["trials"]) == 5


@pytest.mark.parametrize("fault, says", [
    ("misattribute", "reuse records"),  # reuse credited to a worker that does not hold the claim
    ("moved", "now reads"),  # the claim moved after its first reuse, and nothing said so
])
def test_each_placement_fault_fails(tmp_path, fault, says):
    test = _run_placement(tmp_path, fault)
    assert test["outcome"] == "failed" and says in test["detail"], test["detail"]
