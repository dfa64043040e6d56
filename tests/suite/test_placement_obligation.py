"""The placement obligation test can fail: a routed pair of reference runtimes (a test-only
backend, registered the way a vendor's is) passes it, and each placement fault fails it.

The pair is pytest-rkv's claims router (the one `dynamo+rkv` runs) over two reference
runtimes that act as named workers, so the faults are cheap to inject and the placement
tests' verdicts can be checked in seconds. It is a unit-test stand-in and never earns a
row; the live routed row is `dynamo+rkv` (tests/dynamo/test_dynamo_rkv_row.py).
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
from pytest_rkv.adapters.routed import ClaimRouter, refused_everywhere
from pytest_rkv.drivers.base import Driver, Reply
from pytest_rkv.drivers.dynamo_rkv import MergedStream
from pytest_rkv.drivers.reference import ReferenceDriver
from pytest_rkv.errors import Unsupported

FAULT = os.environ.get("ROUTED_PAIR_FAULT", "")
WORKERS = ("w0", "w1")


class NamedWorker:
    """A reference runtime as one worker: its ids start with the worker name and its
    claims, reuse records and events name the worker (what the vLLM adapter does when told
    its worker name)."""

    def __init__(self, name, settings):
        self.name, self.ref = name, ReferenceDriver(settings)

    def _claim(self, reply):
        if not reply.ok:
            return reply
        return Reply(reply.status, value=reply.value.model_copy(
            update={"claim_id": f"{self.name}-{reply.value.claim_id}", "worker": self.name}))

    def _error(self, reply):
        if reply.error is None:
            return reply
        err = reply.error.model_copy(update={
            "blocking_claims": [f"{self.name}-{c}" for c in reply.error.blocking_claims],
            "claimed_blocks": {f"{self.name}-{c}": n for c, n in reply.error.claimed_blocks.items()}})
        return Reply(reply.status, error=err)

    def own(self, claim_id):
        return claim_id.removeprefix(f"{self.name}-")

    def claim(self, req):
        return self._error(self._claim(self.ref.claim(req)))

    def get_claim(self, claim_id):
        return self._claim(self.ref.get_claim(self.own(claim_id)))

    def release(self, claim_id):
        return self._claim(self.ref.release(self.own(claim_id)))

    def complete(self, req):
        if req.claim_id:
            req = req.model_copy(update={"claim_id": self.own(req.claim_id)})
        reply = self._error(self.ref.complete(req))
        if reply.ok and reply.value.rkv:
            named = self.name
            if FAULT == "misattribute":  # reuse credited to the other worker
                named = WORKERS[1 - WORKERS.index(self.name)]
            reuse = [r.model_copy(update={"claim_id": f"{self.name}-{r.claim_id}", "worker": named})
                     for r in reply.value.rkv.reuse]
            rkv = reply.value.rkv.model_copy(update={"reuse": reuse})
            return Reply(reply.status, value=reply.value.model_copy(update={"rkv": rkv}))
        return reply

    def events(self, after=0):
        def named(e):
            return e.model_copy(update={
                "worker": self.name, "claim_id": f"{self.name}-{e.claim_id}" if e.claim_id else None,
                "blocking_claims": [f"{self.name}-{c}" for c in e.blocking_claims]})
        return [named(e) for e in self.ref.events(after)]

    def pool(self):
        return self.ref.pool()


class RoutedPairDriver(Driver):
    """Two reference runtimes behind pytest-rkv's claims router; its index is each
    worker's live claims (a prompt's overlap is the claimed prefix it starts with)."""
    name = "routed-pair"
    depth = "native"
    routed = True

    def start(self):
        self.engines = {w: NamedWorker(w, self.settings) for w in WORKERS}
        for e in self.engines.values():
            e.ref.start()
        self.router = ClaimRouter(self.engines, self.overlap)
        if FAULT == "no_arbitration":  # the first worker's refusal is final
            self.router._first_admitting = lambda order, ask: ask(order[0])
        if FAULT == "names_one_worker":  # the refusal names the last worker's claims only
            self.router._first_admitting = self._names_one
        if FAULT == "static_order":  # a fixed worker order, the index never asked
            from pytest_rkv.adapters.routed import Choice
            self.router.choose = lambda tokens: Choice(list(WORKERS), {}, {})
        self.reuses = 0

    def _names_one(self, order, ask):
        replies = []
        for w in order:
            reply = ask(w)
            if reply.ok or reply.error.type not in ("no_admit", "active_refusal"):
                return reply
            replies.append((w, reply))
        merged = refused_everywhere(replies)
        err = merged.error.model_copy(update={"blocking_claims": replies[-1][1].error.blocking_claims})
        return Reply(merged.status, error=err)

    def overlap(self, tokens):
        """The full blocks each worker's resident claims share with the prompt, in tokens."""
        block = self.engines["w0"].ref.info().block_size
        found = {}
        for w, e in self.engines.items():
            for c in e.ref.list_claims():
                if c.state.value == "resident":
                    shared = 0
                    for a, b in zip(tokens, self.prompts.get(c.claim_id, [])):
                        if a != b:
                            break
                        shared += 1
                    found[w] = max(found.get(w, 0), shared // block * block)
        return found

    def info(self):
        return self.engines["w0"].ref.info().model_copy(update={"routed": True})

    def reset(self):
        for e in self.engines.values():
            e.ref.reset()
        self.prompts, self.reuses = {}, 0
        self.stream = MergedStream(dict.fromkeys(WORKERS, 0))

    def workers(self):
        return list(WORKERS)

    def place(self, req):
        reply, _ = self.router.place(req)
        if reply.ok:
            self.prompts[self.engines[reply.value.worker].own(reply.value.claim_id)] = list(req.prompt_token_ids)
        return reply

    def claim(self, req):
        return self.engines["w0"].claim(req)

    def get_claim(self, claim_id):
        reply = self.engines[self.router.worker_of(claim_id) or "w0"].get_claim(claim_id)
        if FAULT == "moved" and reply.ok and self.reuses:  # re-materialized elsewhere, silently
            other = WORKERS[1 - WORKERS.index(reply.value.worker)]
            return Reply(reply.status, value=reply.value.model_copy(update={"worker": other}))
        return reply

    def release(self, claim_id):
        return self.engines[self.router.worker_of(claim_id) or "w0"].release(claim_id)

    def route(self, req, worker=None):
        from pytest_rkv.drivers.base import Routed
        reply, served, choice = self.router.route(req, worker)
        if reply.ok and reply.value.rkv and reply.value.rkv.reuse:
            self.reuses += 1
        if FAULT == "misrouted" and served:  # served where the router chose, reported elsewhere
            served = WORKERS[1 - WORKERS.index(served)]
        return reply, Routed(worker=served, reason=choice.evidence() if choice else None)

    def complete(self, req):
        return self.route(req, worker=self.router.worker_of(req.claim_id or "") or "w0")[0]

    def events(self, after=0):
        self.stream.pull(lambda w, a: self.engines[w].events(a))
        return self.stream.after(after)
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
                           "-k", "routed", "--rkv-backend=routed-pair", "--rkv-report-dir", str(report),
                           "-p", "no:cacheprovider", "-q"], env=env, capture_output=True, text=True, timeout=300)
    rows = list(report.glob("*/row.json"))
    assert rows, proc.stdout[-3000:] + proc.stderr[-2000:]
    tests = json.loads(rows[0].read_text())["obligations"]["placement"]["tests"]
    return {t["nodeid"].rsplit("::", 1)[-1].split("[")[0]: t for t in tests}


REUSE = "test_routed_reuse_names_the_worker_holding_the_claim"
ARBITRATION = "test_routed_request_goes_where_it_fits_and_is_refused_only_where_none_fits"


def test_correct_placement_passes(tmp_path):
    tests = _run_placement(tmp_path, "")
    assert {name: t["outcome"] for name, t in tests.items()} == {REUSE: "passed", ARBITRATION: "passed"}, tests
    evidence = tests[REUSE]["evidence"]
    assert sorted(evidence["workers"].values()) == ["w0", "w1"] and len(evidence["trials"]) == 6
    assert all(t["why"]["overlap_tokens"][t["served_by"]] == 10 * 16 for t in evidence["trials"]), evidence["trials"]
    assert tests[ARBITRATION]["evidence"]["admitted_on"] == "w1"


@pytest.mark.parametrize("fault, test, says", [
    ("misattribute", REUSE, "reuse records"),  # reuse credited to a worker that does not hold the claim
    ("moved", REUSE, "now reads"),  # the claim moved after its first reuse, and nothing said so
    ("misrouted", REUSE, "was routed to"),  # the answer names a worker that does not hold the claim
    ("static_order", REUSE, "was routed to"),  # the index is never asked: one claim's reuse runs cold
    ("no_arbitration", ARBITRATION, "the refusal names"),  # the first worker's refusal is final
    ("names_one_worker", ARBITRATION, "the refusal names"),  # a refusal hides one worker's blockers
])
def test_each_placement_fault_fails(tmp_path, fault, test, says):
    tests = _run_placement(tmp_path, fault)
    assert tests[test]["outcome"] == "failed" and says in tests[test]["detail"], tests[test]
