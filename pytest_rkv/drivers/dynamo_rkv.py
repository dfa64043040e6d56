"""`dynamo+rkv`: claims on a routed deployment of real vLLM engines, indexed by Dynamo.

What runs (all supervised, all stopped on failure, Ctrl-C or kill):

* two real vLLM servers, each exactly the `vllm+rkv` backend (the claims adapter loaded,
  the canonical 80-block pool), told their worker names `w0` and `w1`: the adapter then
  names the worker in its claim ids, claims, reuse records and events;
* Dynamo 1.6.1's standalone KV indexer (`python -m dynamo.indexer`, from Dynamo's venv,
  inside a loopback-only network namespace because its HTTP server binds every
  interface), subscribed to both engines' own KV event streams: the global index of
  which worker caches which prefix, evictions included;
* the claims router (`pytest_rkv.adapters.routed`), in this process: it places claims and
  routes requests from the index's per-worker overlap and the workers' own answers.

So the index is Dynamo's and the routing decision is ours: `dynamo.vllm` workers (where
Dynamo's router would decide) drive an engine with no HTTP app, so the adapter's claim
API cannot be reached there (docs/dynamo.md). The row's `runtime_details` says so.

The probe vocabulary: `place(req)` and `route(req)` are the router's (the placement tests
use them); the single-pool calls (`claim`, `complete`, `pool`, faults) go to the *home*
worker `w0`, as on `dynamo`, because the canonical probe is written for one 80-block pool.
A completion that names a claim goes to the claim's worker. Claim events and block events
are both workers' streams, merged by this driver with one seq (`MergedStream`).
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

from pytest_rkv.adapters.routed import ClaimRouter
from pytest_rkv.contract import (
    Claim,
    ClaimRequest,
    Completion,
    CompletionRequest,
    Depth,
    Event,
    EventPage,
    FaultRequest,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.drivers import netns
from pytest_rkv.drivers.base import Driver, DriverSettings, Reply, Routed
from pytest_rkv.drivers.dynamo import deploy
from pytest_rkv.drivers.dynamo.indexer import KvIndex
from pytest_rkv.drivers.netns import LoopbackNamespace
from pytest_rkv.drivers.vllm_rkv import VllmRkvDriver
from pytest_rkv.errors import BackendUnavailable, HarnessError

WORKERS = ("w0", "w1")
HOME = WORKERS[0]


@dataclass
class MergedStream:
    """Several workers' event streams as one: each pull appends what is new, per worker in
    its own order, and numbers it on."""

    cursors: dict[str, int]
    log: list[Event] = field(default_factory=list)
    owner: list[str] = field(default_factory=list)  # the worker of log[i]

    def pull(self, fetch: Callable[[str, int], list[Event]]) -> None:
        """What is new on every worker, interleaved by time stamp (each worker's own order
        kept): events of different workers read in one pull appear in the order they
        happened, so the merged trace reads like one runtime's."""
        batches = []
        for worker in self.cursors:
            new = fetch(worker, self.cursors[worker])
            if new:
                self.cursors[worker] = new[-1].seq
            batches.append([(e.ts, worker, e) for e in new])
        for _, worker, event in heapq.merge(*batches, key=lambda item: item[0]):
            self.log.append(event.model_copy(update={"seq": len(self.log) + 1}))
            self.owner.append(worker)

    def after(self, seq: int, worker: str | None = None) -> list[Event]:
        return [e for e, w in zip(self.log, self.owner) if e.seq > seq and worker in (None, w)]

    def clear(self) -> None:
        self.cursors = dict.fromkeys(self.cursors, 0)
        self.log, self.owner = [], []


class DynamoRkvDriver(Driver):
    name: ClassVar[str] = "dynamo+rkv"
    depth: ClassVar[Depth] = "adapter"
    routed: ClassVar[bool] = True
    requires: ClassVar[tuple[str, ...]] = VllmRkvDriver.requires
    distribution: ClassVar[str | None] = VllmRkvDriver.distribution

    def __init__(self, settings: DriverSettings) -> None:
        super().__init__(settings)
        self.engines = {w: VllmRkvDriver(replace(settings, workdir=settings.workdir / w), worker=w) for w in WORKERS}
        self.netns: LoopbackNamespace | None = None
        self.index: KvIndex | None = None
        self.router: ClaimRouter | None = None
        self.claim_events = MergedStream(dict.fromkeys(WORKERS, 0))
        self.kv_events = MergedStream(dict.fromkeys(WORKERS, 0))
        self.placements: dict[str, dict] = {}  # claim id -> why the router placed it there

    @classmethod
    def check_available(cls) -> None:
        VllmRkvDriver.check_available()
        for why in (deploy.missing_venv(), netns.unavailable()):
            if why:
                raise BackendUnavailable(f"needs Dynamo's standalone indexer: {why}")

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        workdir = self.settings.workdir
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.netns = LoopbackNamespace(workdir)
            self.netns.start()
            # One after the other: two engines starting at once on a small machine only
            # slow each other down, and every process must be launched from this thread.
            for engine in self.engines.values():
                engine.start()
            self.index = KvIndex(self.netns, deploy.venv_python(), workdir, block_size=self._block_size(),
                                 endpoints={w: self._endpoint(w) for w in WORKERS})
            self.index.start(timeout=self.settings.startup_timeout)
            self.router = ClaimRouter(self.engines, self.index.overlap)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Every part, even if stopping one of them raises (the first error is raised last)."""
        parts = [*([self.index.stop] if self.index is not None else []),
                 *(engine.stop for engine in self.engines.values()),
                 *([self.netns.stop] if self.netns is not None else [])]
        errors = []
        for stop in parts:
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                errors.append(exc)
        if errors:
            raise errors[0]

    def check_alive(self) -> None:
        for engine in self.engines.values():
            engine.check_alive()
        if self.index is not None:
            self.index.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        parts = [f"== vLLM worker {w} ==\n{e.log_tail(lines // 3)}" for w, e in self.engines.items()]
        if self.index is not None:
            parts.append(f"== Dynamo indexer ==\n{self.index.log_tail(lines // 3)}")
        return "\n".join(parts)

    def describe(self) -> dict:
        facts = self.engines[HOME].describe()
        facts.update({
            "workers": list(WORKERS),
            "engines": "one vllm+rkv server per worker (the claims adapter, told its worker name)",
            "index": f"Dynamo's standalone KV indexer (python -m dynamo.indexer, ai-dynamo "
                     f"{self.index.version if self.index else '?'}), fed by the engines' own KV events",
            "routing": "ours: pytest_rkv.adapters.routed (index overlap, then room; the next worker on a "
                       "refusal); Dynamo's router is not in the path",
            "single_pool_probes_pinned_to": f"{HOME} (claim, complete, pool, faults); place() and route() route",
            "network": "the indexer in a loopback-only network namespace (unshare -n); engines on 127.0.0.1",
        })
        return facts

    # -- RKV API v1: the single-pool vocabulary goes to the home worker ---------------
    def info(self) -> RuntimeInfo:
        return self.engines[HOME].info().model_copy(update={"routed": True})

    def reset(self) -> None:
        """Every engine reset, and the index empty. An engine publishes its cache-cleared
        event only at its next step, and until then the index still shows what it held,
        so each engine is stepped once with a prompt shorter than a block (it stores
        nothing), the index is awaited empty, and the engines are reset again (which drops
        the step's own events; the second cleared event is queued before any later one,
        so the index keeps up)."""
        for engine in self.engines.values():
            engine.reset()
            engine.complete(CompletionRequest(prompt=[1] * (self._block_size() // 2), max_tokens=1)).unwrap()
        self._index().wait_empty()
        for engine in self.engines.values():
            engine.reset()
        self.claim_events.clear()
        self.kv_events.pull(lambda w, after: self.engines[w].block_events(after))  # the reset's own
        self.kv_events.log, self.kv_events.owner = [], []
        self.placements = {}

    def claim(self, req: ClaimRequest) -> Reply[Claim]:
        return self.engines[HOME].claim(req)

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        """On the home worker, or on the worker of the claim it names."""
        worker = self._router().worker_of(req.claim_id) if req.claim_id else None
        return self._router().route(req, worker=worker or HOME)[0]

    def complete_at_priority(self, req: CompletionRequest, priority: int) -> Reply[Completion]:
        return self.engines[HOME].complete_at_priority(req, priority)

    def get_claim(self, claim_id: str) -> Reply[Claim]:
        return self._engine_of(claim_id).get_claim(claim_id)

    def release(self, claim_id: str) -> Reply[Claim]:
        return self._engine_of(claim_id).release(claim_id)

    def list_claims(self) -> list[Claim]:
        return [c for engine in self.engines.values() for c in engine.list_claims()]

    def events(self, after: int = 0) -> list[Event]:
        self.claim_events.pull(lambda w, a: self.engines[w].events(a))
        return self.claim_events.after(after)

    def event_page(self, after: int, limit: int) -> EventPage:
        events = self.events(after)
        page = events[:limit]
        log = self.claim_events.log
        return EventPage(events=page, last_seq=page[-1].seq if page else after, more=len(events) > limit,
                         oldest_seq=log[0].seq if log else 0)

    def pool(self) -> PoolState:
        return self.engines[HOME].pool()

    def inject_fault(self, req: FaultRequest) -> None:
        self.engines[HOME].inject_fault(req)

    def other_tenant(self) -> "DynamoRkvDriver":
        """Tenant B on every worker, with its own merged event view."""
        view = copy.copy(self)
        view.engines = {w: e.other_tenant() for w, e in self.engines.items()}
        view.router = ClaimRouter(view.engines, self._index().overlap)
        view.claim_events = MergedStream(dict.fromkeys(WORKERS, 0))
        return view

    def metrics(self) -> dict[str, float]:
        return self.engines[HOME].metrics()

    # -- routed vocabulary -----------------------------------------------------------
    def workers(self) -> list[str]:
        return list(WORKERS)

    def place(self, req: ClaimRequest) -> Reply[Claim]:
        reply, choice = self._router().place(req)
        if reply.ok and reply.value is not None:
            self.placements[reply.value.claim_id] = choice.evidence()
        return reply

    def placement_reason(self, claim_id: str) -> dict | None:
        """Why the router placed a claim where it did (evidence for the placement tests)."""
        return self.placements.get(claim_id)

    def route(self, req: CompletionRequest, worker: str | None = None) -> tuple[Reply[Completion], Routed]:
        reply, served, choice = self._router().route(req, worker)
        return reply, Routed(worker=served, reason=choice.evidence() if choice else None)

    def block_events(self, after: int = 0) -> list[Event]:
        self.kv_events.pull(lambda w, a: self.engines[w].block_events(a))
        return self.kv_events.after(after)

    def worker_block_events(self, worker: str, after: int = 0) -> list[Event]:
        self.kv_events.pull(lambda w, a: self.engines[w].block_events(a))
        return self.kv_events.after(after, worker)

    # -- plumbing --------------------------------------------------------------------
    def _router(self) -> ClaimRouter:
        if self.router is None:
            raise HarnessError("the dynamo+rkv driver was used before start() succeeded")
        return self.router

    def _index(self) -> KvIndex:
        if self.index is None:
            raise HarnessError("the dynamo+rkv driver was used before start() succeeded")
        return self.index

    def _engine_of(self, claim_id: str) -> VllmRkvDriver:
        return self.engines[self._router().worker_of(claim_id) or HOME]

    def _block_size(self) -> int:
        size = self.engines[HOME].block_size
        assert size is not None
        return size

    def _endpoint(self, worker: str) -> str:
        plan = self.engines[worker].plan
        assert plan is not None
        return plan.events_endpoint
