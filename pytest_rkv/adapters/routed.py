"""Claims on a routed deployment: RKV API v1 over several RKV workers and one KV index.

`dynamo+rkv` puts this in front of real vLLM engines that each run the claims adapter
(`adapters/vllm`, told its worker name), with Dynamo's standalone KV indexer as the
global index of what every worker caches (built from the engines' own KV events). The
index is Dynamo's; **the routing decision is this module's**, and the row says so.

Decisions, each from the workers' own answers, never from a model of their pools:

* **Why** each decision was made (the index's overlap per worker, each worker's room, the
  order asked) is returned with it, for the row's evidence.
* **Placement of a claim**: the worker whose cache already holds the longest part of the
  claim's prompt (the index), then the one with the most room (free + unclaimed cached
  blocks, its `GET /v1/kv/pool`), then the first. If that worker does not admit the claim
  (`no_admit`: its claim budget, its hard claims), the next is asked; the claim is
  refused only when every worker refused it, with every worker's reason.
* **Routing of a request**: a request that names a claim goes to the claim's worker (the
  worker is part of the claim id, so nothing here can forget or move it). Any other goes
  to the worker the index says holds most of its prompt, then by room. If that worker
  refuses it (`active_refusal`: it would evict a hard claim there), the next is asked, so
  a request that cannot fit beside a hard claim on one worker runs on another; it is
  refused only when every worker refused it, naming every worker's blocking claims.
  Each refusal is also in that worker's event stream, with its worker named.
* Anything else a worker answers (a validation error, a request larger than any pool)
  is the answer: another worker would say the same.

A claim never moves: a demoted or lost claim reads so on its own worker; nothing here
re-materializes it elsewhere.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pytest_rkv.contract import Claim, ClaimRequest, Completion, CompletionRequest, ErrorBody
from pytest_rkv.drivers.base import Driver, Reply

# The index learns from the engines' event streams, a few milliseconds behind them.
INDEX_SETTLE_S = 5.0
# The worker ran out of room beside hard claims: another worker may have it.
RETRY_ON_ANOTHER_WORKER = frozenset({"no_admit", "active_refusal"})


@dataclass(frozen=True)
class Choice:
    """Why the router asked the workers in this order (recorded as evidence)."""

    order: list[str]
    overlap_tokens: dict[str, int]  # the index's answer: cached prompt tokens per worker
    room_blocks: dict[str, int]
    index_settled: bool | None = None  # placement: the index showed the claim on its worker in time

    def evidence(self) -> dict:
        facts: dict = {"order": self.order, "overlap_tokens": self.overlap_tokens, "room_blocks": self.room_blocks}
        if self.index_settled is not None:
            facts["index_settled"] = self.index_settled
        return facts


class ClaimRouter:
    def __init__(self, workers: Mapping[str, Driver], overlap: Callable[[Sequence[int]], dict[str, int]]) -> None:
        """`workers`: worker name -> an RKV API v1 driver of that worker's engine, in
        preference order for ties. `overlap(tokens)`: the global index's cached prompt
        tokens per worker name (workers with none may be absent)."""
        self.workers = dict(workers)
        self.overlap = overlap

    # -- placement -------------------------------------------------------------------
    def place(self, req: ClaimRequest) -> tuple[Reply[Claim], Choice]:
        """The claim's `POST` answers once the index shows its prefix on its worker, so
        that a request sent after the answer is routed with the claim in view."""
        choice = self.choose(req.prompt_token_ids)
        reply = self._first_admitting(choice.order, lambda w: self.workers[w].claim(req))
        claim = reply.value if reply.ok else None
        if claim is not None and claim.worker in self.workers and claim.state.value == "resident":
            settled = self._await_index(req.prompt_token_ids, claim.worker, claim.tokens)
            choice = Choice(choice.order, choice.overlap_tokens, choice.room_blocks, index_settled=settled)
        return reply, choice

    def route(self, req: CompletionRequest, worker: str | None = None
              ) -> tuple[Reply[Completion], str | None, Choice | None]:
        """The answer, the worker that served it (None when every worker refused), and why
        the workers were asked in that order (None when the worker was given or named by
        the request's claim)."""
        if worker is None:
            worker = self.worker_of(req.claim_id) if req.claim_id else None
        if worker is not None:
            return self.workers[worker].complete(req), worker, None
        choice = self.choose(req.prompt)
        served: list[str] = []

        def ask(w: str) -> Reply[Completion]:
            served[:] = [w]
            return self.workers[w].complete(req)

        reply = self._first_admitting(choice.order, ask)
        return reply, (served[0] if reply.ok else None), choice

    def worker_of(self, claim_id: str) -> str | None:
        """The worker a claim id names (adapters with a worker name prefix their ids)."""
        head = claim_id.split("-", 1)[0]
        return head if head in self.workers else None

    def _await_index(self, tokens: Sequence[int], worker: str, cached: int) -> bool:
        """Whether the index came to show `cached` tokens of `tokens` on `worker` in time
        (if not, the claim stands; later routing sees whatever the index shows)."""
        deadline = time.monotonic() + INDEX_SETTLE_S
        while self.overlap(tokens).get(worker, 0) < cached:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    # -- the decision ----------------------------------------------------------------
    def choose(self, tokens: Sequence[int]) -> Choice:
        seen = self.overlap(tokens) if tokens else {}  # one query: one moment of the index
        overlap = {w: int(seen.get(w, 0)) for w in self.workers}
        room = {}
        for w, driver in self.workers.items():
            pool = driver.pool()
            room[w] = pool.free_blocks + pool.cached_blocks
        names = list(self.workers)
        order = sorted(names, key=lambda w: (-overlap[w], -room[w], names.index(w)))
        return Choice(order, overlap, room)

    def _first_admitting(self, order: list[str], ask: Callable[[str], Reply]) -> Reply:
        refusals: list[tuple[str, Reply]] = []
        for w in order:
            reply = ask(w)
            if reply.ok or reply.error is None or reply.error.type not in RETRY_ON_ANOTHER_WORKER:
                return reply
            refusals.append((w, reply))
        return refused_everywhere(refusals)


def refused_everywhere(refusals: list[tuple[str, Reply]]) -> Reply:
    """One refusal that carries every worker's: their blocking claims (ids name their
    worker), claimed blocks and reasons. Block arithmetic is per worker, so the summed
    `needed/free/evictable` fields are left out; each worker's is in its message."""
    status, last = refusals[-1][1].status, refusals[-1][1].error
    assert last is not None
    blocking: list[str] = []
    claimed: dict[str, int] = {}
    for _, reply in refusals:
        assert reply.error is not None
        blocking += [c for c in reply.error.blocking_claims if c not in blocking]
        claimed.update(reply.error.claimed_blocks)
    message = "refused by every worker: " + "; ".join(f"{w}: {r.error.message}" for w, r in refusals)  # type: ignore[union-attr]
    return Reply(status, error=ErrorBody(type=last.type, message=message, reason=last.reason,
                                         request_id=last.request_id, blocking_claims=blocking,
                                         claimed_blocks=claimed))
