"""Claim workloads, written in blocks and converted with the backend's block size.

`Probe` is what an obligation test holds: the driver plus the vocabulary of the litmus
cases (the canonical 80/60/70 geometry, prompts named by tag, evidence recording).
Prompts are deterministic functions of (tag, blocks), so every process and every run
sends the same tokens, and distinct tags never share a first block.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable

from pytest_rkv.contract import (
    Claim,
    ClaimRequest,
    Completion,
    CompletionRequest,
    Event,
    EventType,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.drivers.base import Driver, Reply, Routed
from pytest_rkv.errors import NoAnswer
from pytest_rkv.trace import Ledger, content_problems, order_problems

# The canonical probe (in blocks): a pool of 80 usable blocks, a 60-block resident claim,
# a 70-block active prefill. 60 + 70 > 80, so they cannot both fit.
POOL_BLOCKS = 80
RESIDENT_BLOCKS = 60
ACTIVE_BLOCKS = 70

VOCAB = 500  # token ids stay below this (the generated tiny models have a bigger vocab)


def prompt_tokens(tag: str, blocks: int, block_size: int, extra_tokens: int = 0) -> list[int]:
    seed = int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "big")
    rng = random.Random(seed)
    return [rng.randrange(1, VOCAB) for _ in range(blocks * block_size + extra_tokens)]


class Timeline:
    """Pool occupancy through the canonical probe, step by step, for the matrix's plot.

    Occupancy comes from block-level events (which blocks the resident prompt stored, which
    of those were later evicted), so it reads the same on a claim runtime and on a stock one.
    Steps: one dict each, {"step", "resident", "active", "free", "mark"}.
    """

    def __init__(self, probe: "Probe") -> None:
        self.probe = probe
        self.steps: list[dict] = []
        self._resident: set[str] = set()
        self._mark = probe.block_mark()

    def _new_events(self) -> tuple[set[str], set[str]]:
        events = self.probe.driver.block_events(after=self._mark)
        if events:
            self._mark = events[-1].seq
        stored = {h for e in events if e.type == EventType.BLOCKS_STORED for h in e.block_hashes}
        evicted = {h for e in events if e.type == EventType.BLOCKS_EVICTED for h in e.block_hashes}
        return stored, evicted

    def _add(self, label: str, active: int, mark: str | None) -> None:
        resident = len(self._resident)
        self.steps.append({"step": label, "resident": resident, "active": active,
                           "free": max(0, POOL_BLOCKS - resident - active), "mark": mark})

    def resident_written(self, label: str) -> None:
        stored, _ = self._new_events()
        self._resident |= stored
        self._add(label, 0, None)

    def active_ran(self, label: str, admitted: bool, blocks: int = ACTIVE_BLOCKS) -> None:
        _, evicted = self._new_events()
        lost = len(self._resident & evicted)
        self._resident -= evicted
        self._add(label, blocks if admitted else 0, "admitted" if admitted else "refused")
        self.steps[-1]["resident_lost"] = lost

    def resident_measured(self, label: str, cached_blocks: int) -> None:
        self._new_events()
        self._add(label, 0, None)
        self.steps[-1]["resident"] = cached_blocks
        self.steps[-1]["free"] = POOL_BLOCKS - cached_blocks


class Probe:
    def __init__(self, driver: Driver, info: RuntimeInfo, record: Callable[[str, object], None]) -> None:
        self.driver = driver
        self.info = info
        self.block_size = info.block_size
        self._record = record
        self._requests = 0
        self._pool_steps: list[dict] = []
        self.ledger = Ledger()  # what this test did, to hold the events against

    # -- prompts ---------------------------------------------------------------------
    def tokens(self, tag: str, blocks: int, extra_tokens: int = 0) -> list[int]:
        return prompt_tokens(tag, blocks, self.block_size, extra_tokens)

    def request_id(self, label: str) -> str:
        self._requests += 1
        return f"rkv-{label}-{self._requests}"

    # -- actions ---------------------------------------------------------------------
    def claim(self, tag: str, blocks: int, strength: str = "hard", *, ttl_s: float | None = None,
              demotable: bool = False, extra_tokens: int = 0) -> Reply[Claim]:
        reply = self.driver.claim(ClaimRequest(
            prompt_token_ids=self.tokens(tag, blocks, extra_tokens),
            strength=strength, ttl_s=ttl_s, demotable=demotable,
        ))
        if reply.value is not None:
            # what was asked for (full blocks of the prompt), not what the runtime echoed
            self.ledger.claims[reply.value.claim_id] = blocks + extra_tokens // self.block_size
        return reply

    def accepted(self, tag: str, blocks: int, strength: str = "hard", **kw) -> Claim:
        """A claim that the test needs accepted and resident to go on."""
        claim = self.claim(tag, blocks, strength, **kw).unwrap()
        assert claim.state.value == "resident", f"claim on {blocks} blocks is {claim.state.value}: {claim}"
        return claim

    def run(self, tag: str, blocks: int, *, extra_tokens: int = 0, max_tokens: int = 1,
            claim_id: str | None = None, label: str | None = None,
            held: Claim | None = None) -> tuple[str, Reply[Completion]]:
        """Send a completion for `blocks` blocks of prompt `tag` (+ extra tokens).

        The runtime must answer it, admitted or refused, within the bounded wait
        (`--rkv-refusal-timeout`). One that leaves it unanswered fails the test; the
        evidence is the wait, the absent refusal, and whether the claim `held` (if the
        test names one) is still held once the wait is over."""
        rid = self.request_id(label or tag)
        try:
            reply = self.driver.complete(CompletionRequest(
                prompt=self.tokens(tag, blocks, extra_tokens), max_tokens=max_tokens,
                claim_id=claim_id, request_id=rid,
            ))
        except NoAnswer as exc:
            state = "no claim named"
            if held is not None:
                now = self.driver.get_claim(held.claim_id).unwrap()
                kept = now.state.value == "resident" and now.resident_blocks == held.blocks
                state = (f"claim {held.claim_id} {'still held' if kept else 'not held'} "
                         f"({now.state.value}, {now.resident_blocks} of {held.blocks} blocks resident)")
            self.record("no_answer", {"request_id": rid, "waited_s": exc.waited_s, "refusal": None,
                                      "claim": state, "detail": exc.detail})
            raise AssertionError(f"request {rid}: no answer in {exc.waited_s:g} s; no refusal; {state}") from None
        if reply.error is not None and reply.error.type == "active_refusal":
            self.ledger.refusals[rid] = reply.error
        return rid, reply

    # -- routed deployments ------------------------------------------------------------
    def place(self, tag: str, blocks: int, strength: str = "hard") -> Claim:
        """A claim the runtime places on a worker of its choosing; the test needs it."""
        claim = self.driver.place(ClaimRequest(prompt_token_ids=self.tokens(tag, blocks), strength=strength)).unwrap()
        self.ledger.claims[claim.claim_id] = blocks
        return claim

    def route(self, prompt: list[int], label: str) -> tuple[str, Reply[Completion], Routed]:
        """A completion the runtime routes; a refusal's arithmetic is per worker, so it is
        not held against the events (their worker-level refusals are checked by the test)."""
        rid = self.request_id(label)
        try:
            reply, where = self.driver.route(CompletionRequest(prompt=prompt, request_id=rid))
        except NoAnswer as exc:  # queued, neither admitted on a worker nor refused: a failure
            self.record("no_answer", {"request_id": rid, "waited_s": exc.waited_s, "detail": exc.detail})
            raise AssertionError(f"routed request {rid}: no answer in {exc.waited_s:g} s; no refusal") from None
        return rid, reply, where

    def reuse_query(self, tag: str, blocks: int, **kw) -> tuple[str, Reply[Completion]]:
        """Ask for the prefix again plus one fresh token, so every prefix block can hit
        (runtimes never serve a prompt's last token from cache)."""
        return self.run(tag, blocks, extra_tokens=1, label=f"{tag}-again", **kw)

    def cached_tokens(self, reply: Reply[Completion]) -> int:
        return reply.unwrap().usage.prompt_tokens_details.cached_tokens

    # -- evidence --------------------------------------------------------------------
    def mark(self) -> int:
        """The last event seq so far; later `events_since(mark)` shows only what follows."""
        events = self.driver.events()
        return events[-1].seq if events else 0

    def block_mark(self) -> int:
        events = self.driver.block_events()
        return events[-1].seq if events else 0

    def evicted_since(self, block_mark: int) -> int:
        """How many block hashes block-level events report evicted after `block_mark`."""
        return sum(len(e.block_hashes) or e.blocks for e in self.driver.block_events(after=block_mark)
                   if e.type == EventType.BLOCKS_EVICTED)

    def events_since(self, mark: int = 0) -> list[Event]:
        """The events with seq > mark. Every read also checks the whole trace so far: the
        page holds exactly the events after `mark` (in order, none twice), and every
        claim's events follow the lifecycle state machine (ordered-lifecycle holds on
        every test's trace, not only on the one test named for it), and every event's fields
        agree with its type, the rest of the trace and what this test did."""
        page = self.driver.events(after=mark)
        trace = self.driver.events()
        # events may arrive between the two reads: compare with the same number of events
        expected = [e for e in trace if e.seq > mark][: len(page)]
        assert page == expected, (
            f"GET /v1/kv/events?after={mark} served seqs {[e.seq for e in page][:30]}, but the events "
            f"with seq > {mark} are {[e.seq for e in expected][:30]}"
        )
        problems = order_problems(trace)
        assert not problems, "the event trace breaks the claim state machine:\n" + "\n".join(problems[:10])
        wrong = content_problems(trace, self.ledger)
        assert not wrong, "events whose fields are not what happened:\n" + "\n".join(wrong[:10])
        return page

    def pool_adds_up(self, step: str) -> PoolState:
        """The pool, checked at a moment when no request runs and no two claims share a
        block: every block is free, cached, active or claimed, exactly once."""
        pool = self.driver.pool()
        claimed = sum(pool.claimed_blocks.values())
        parts = (pool.free_blocks, pool.cached_blocks, pool.active_blocks, claimed)
        self._pool_steps.append({"step": step, "free": parts[0], "cached": parts[1], "active": parts[2],
                                 "claimed": parts[3], "total": pool.total_blocks})
        self.record("pool_steps", self._pool_steps)
        assert (pool.total_blocks, pool.block_size) == (self.info.total_blocks, self.block_size), (
            f"{step}: the pool reports {pool.total_blocks} blocks of {pool.block_size} tokens, "
            f"the runtime {self.info.total_blocks} of {self.block_size}"
        )
        assert min(parts) >= 0 and pool.active_blocks == 0 and sum(parts) == pool.total_blocks, (
            f"{step}: free {parts[0]} + cached {parts[1]} + active {parts[2]} + claimed {parts[3]} = "
            f"{sum(parts)}, but the pool has {pool.total_blocks} blocks and no request is running"
        )
        return pool

    def stays_ended(self, claim: Claim, tag: str, blocks: int, state: str) -> None:
        """An ended claim stays ended: its prefix sent again (twice, so the second is
        served from cache even if the first had to recompute it) credits it no reuse and
        gives it no event, nor does pressure that evicts those blocks again; it still
        reports `state`, and a new claim on the same prefix gets a new id (ids are never
        issued twice)."""
        issued = {e.claim_id for e in self.events_since(0) if e.claim_id}
        mark = self.mark()
        credited = []
        for _ in range(2):
            rid, again = self.reuse_query(tag, blocks)
            record = again.unwrap().rkv
            credited += [r for r in (record.reuse if record else []) if r.claim_id == claim.claim_id]
        # then pressure that takes nearly the whole pool, its prefix's blocks included
        self.run(f"{tag}-pressure", self.info.total_blocks - 5)
        later = [e.type.value for e in self.events_since(mark) if e.claim_id == claim.claim_id]
        now = self.driver.get_claim(claim.claim_id).unwrap()
        fresh = self.claim(tag, blocks).unwrap()
        assert not credited, f"the {state} claim {claim.claim_id} was credited with reuse by {rid}: {credited}"
        assert not later, f"the {state} claim {claim.claim_id} got events after it ended: {later}"
        assert now.state.value == state, f"the {state} claim {claim.claim_id} now reports {now.state.value}"
        assert fresh.claim_id not in issued, (
            f"a new claim got the id {fresh.claim_id!r}, already issued in this run (ids must never repeat)"
        )

    def of_type(self, events: list[Event], *types: EventType) -> list[Event]:
        return [e for e in events if e.type in types]

    def timeline(self) -> Timeline:
        return Timeline(self)

    def record(self, key: str, value: object) -> None:
        """Attach a JSON-able fact to this test's evidence (it lands in row.json)."""
        json.dumps(value)  # fail here, in the test, if it is not JSON
        self._record(key, value)
