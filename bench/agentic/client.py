"""The agent and background clients: real HTTP against one live server, one thread each.

Agent turns are **streamed** (`stream: true`, usage in the last chunk), so the time to first
token is measured where a user sees it; `cached_tokens` comes from vLLM's own
`usage.prompt_tokens_details`. Background requests are plain completions. With a claim
policy, the agent claims its whole context (`POST /v1/kv/claims`) when a turn ends, holds it
across the tool pause, names it in the next turn, and releases it once that turn has reused
it. Refusals are handled by `policy.RefusalPolicy` and recorded, never hidden.

Everything a figure needs is recorded per turn / per request with wall-clock times
(`time.time()`, the clock vLLM stamps its KV event batches with), so the KV-event
cross-check can tie block stores to a turn afterwards.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import requests

from bench.agentic.policy import RefusalPolicy, recomputed_tokens
from bench.agentic.workload import Session, Workload, background_request

REQUEST_TIMEOUT = 300.0


@dataclass(frozen=True)
class ClaimPolicy:
    """How an agent holds its context across a tool pause (None in a configuration: no claim)."""

    strength: str = "hard"  # "hard" | "soft"
    ttl_s: float | None = None
    demotable: bool = False


# ------------------------------------------------------------------------ pure parsing


@dataclass
class StreamResult:
    ttft_s: float | None = None
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None


def sse_payloads(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream (`data: {...}` lines, up to `[DONE]`)."""
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def read_stream(payloads: Iterable[dict], began: float, clock=time.perf_counter) -> StreamResult:
    """Fold a completion stream into a StreamResult; TTFT is taken when the first chunk
    carrying a token arrives (measured from `began` on `clock`)."""
    out = StreamResult()
    for chunk in payloads:
        for choice in chunk.get("choices") or []:
            ids = choice.get("token_ids") or []
            if (ids or choice.get("text")) and out.ttft_s is None:
                out.ttft_s = clock() - began
            out.output_ids.extend(ids)
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage:
            out.prompt_tokens = usage.get("prompt_tokens")
            details = usage.get("prompt_tokens_details") or {}
            # vLLM omits the details when nothing was cached in some versions: that is 0.
            out.cached_tokens = int(details.get("cached_tokens") or 0)
    return out


def is_refused_stream(result: StreamResult) -> bool:
    """An adapter refusal ends a stream with finish_reason "abort" and no token."""
    return result.finish_reason == "abort" and not result.output_ids


# ------------------------------------------------------------------------ records


@dataclass
class TurnRecord:
    session: int
    agent: int
    turn: int
    prompt_tokens: int
    known_tokens: int  # computed by an earlier turn of this session
    cached_tokens: int
    recomputed_tokens: int
    ttft_s: float
    latency_s: float
    sent_at: float  # wall clock of the successful attempt
    done_at: float
    refusals: int  # refused attempts before it ran
    claim_id: str | None  # the claim named in the request
    private_from_block: int  # blocks before this index are the shared system prefix
    request_id: str
    prompt_hash_key: list[int] = field(default_factory=list, repr=False)  # the prompt, for the cross-check


@dataclass
class ClaimAttempt:
    session: int
    turn: int
    outcome: str  # "resident" | "fallback" | "failed:<state>"
    refusals: list[str]  # the reasons of the 409s it met
    blocks: int
    latency_s: float
    sent_at: float  # wall clock: the materializing prefill's KV events fall in [sent_at, done_at]
    done_at: float
    prompt_hash_key: list[int] = field(default_factory=list, repr=False)


@dataclass
class BackgroundRecord:
    worker: int
    index: int
    prompt_tokens: int
    cached_tokens: int
    latency_s: float
    done_at: float
    refusals: int


@dataclass
class SegmentLog:
    turns: list[TurnRecord] = field(default_factory=list)
    failed_turns: list[dict] = field(default_factory=list)
    claims: list[ClaimAttempt] = field(default_factory=list)
    background: list[BackgroundRecord] = field(default_factory=list)
    background_refusals: int = 0
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, item) -> None:
        with self.lock:
            getattr(self, name).append(item)


# ------------------------------------------------------------------------ live clients


class Endpoint:
    """One server's base URL and served model name; a requests.Session per thread."""

    def __init__(self, base_url: str, served_name: str, authorization: str | None = None) -> None:
        self.base_url, self.served_name = base_url, served_name
        self.authorization = authorization  # the adapter's servers have tenants: a tenant's token
        self._local = threading.local()

    @property
    def http(self) -> requests.Session:
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = requests.Session()
            if self.authorization:
                s.headers["Authorization"] = self.authorization
        return s

    def body(self, prompt: list[int], max_tokens: int, request_id: str) -> dict:
        return {"model": self.served_name, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0.0, "ignore_eos": True, "return_token_ids": True,
                "request_id": request_id}


def stream_turn(ep: Endpoint, prompt: list[int], max_tokens: int, request_id: str,
                claim_id: str | None) -> tuple[StreamResult, float, float, float]:
    """One streamed completion: (result, sent_at wall, latency s, perf start)."""
    body = ep.body(prompt, max_tokens, request_id)
    body.update(stream=True, stream_options={"include_usage": True})
    if claim_id is not None:
        body["claim_id"] = claim_id
    sent_at = time.time()
    began = time.perf_counter()
    with ep.http.post(ep.base_url + "/v1/completions", json=body, stream=True,
                      timeout=REQUEST_TIMEOUT) as resp:
        if resp.status_code == 409:  # a refusal answered before the stream began
            return StreamResult(finish_reason="abort"), sent_at, time.perf_counter() - began, began
        if not resp.ok:
            raise RuntimeError(f"turn {request_id}: HTTP {resp.status_code} {resp.text[:300]}")
        result = read_stream(sse_payloads(resp.iter_lines()), began)
    return result, sent_at, time.perf_counter() - began, began


class AgentRunner:
    """Runs the sessions of one agent slot, one after another."""

    def __init__(self, ep: Endpoint, workload: Workload, agent: int, tag: str, log: SegmentLog,
                 claim: ClaimPolicy | None, policy: RefusalPolicy, stop: threading.Event) -> None:
        self.ep, self.workload, self.agent, self.tag, self.log = ep, workload, agent, tag, log
        self.claim_policy, self.policy, self.stop = claim, policy, stop
        self.block_size = workload.params.block_size

    def run(self) -> None:
        try:
            for session in self.workload.sessions_of(self.agent):
                if self.stop.is_set():
                    return
                self.run_session(session)
        except Exception as exc:  # recorded; the segment reports it, never a silent pass
            self.log.add("errors", f"agent {self.agent}: {exc.__class__.__name__}: {exc}")

    def run_session(self, session: Session) -> None:
        context = list(self.workload.system) + list(session.task)
        known = 0
        claim_id: str | None = None
        system_blocks = len(self.workload.system) // self.block_size
        for t, turn in enumerate(session.turns):
            rid_base = f"{self.tag}-s{session.session_id}-t{t}"
            refusals = 0
            while True:
                rid = f"{rid_base}-a{refusals}"
                result, sent_at, latency, _ = stream_turn(self.ep, context, turn.decode_tokens, rid, claim_id)
                if not is_refused_stream(result):
                    break
                refusals += 1
                decision = self.policy.after_turn_refused(refusals)
                if decision.action == "fail":
                    self.log.add("failed_turns", {"session": session.session_id, "turn": t,
                                                  "refusals": refusals, "request_id": rid})
                    self._release(claim_id)
                    return
                time.sleep(decision.delay_s)
            if result.prompt_tokens is None or result.cached_tokens is None:
                raise RuntimeError(f"turn {rid}: the stream carried no usage (finish {result.finish_reason})")
            if result.prompt_tokens != len(context):
                raise RuntimeError(f"turn {rid}: server counted {result.prompt_tokens} prompt tokens, "
                                   f"sent {len(context)}")
            self.log.add("turns", TurnRecord(
                session=session.session_id, agent=self.agent, turn=t, prompt_tokens=len(context),
                known_tokens=known, cached_tokens=result.cached_tokens,
                recomputed_tokens=recomputed_tokens(known, len(context), result.cached_tokens),
                ttft_s=result.ttft_s if result.ttft_s is not None else latency, latency_s=latency,
                sent_at=sent_at, done_at=time.time(), refusals=refusals, claim_id=claim_id,
                private_from_block=system_blocks, request_id=rid, prompt_hash_key=list(context)))
            # The turn reused (or lost) the claim; it is replaced by one on the grown context.
            self._release(claim_id)
            claim_id = None
            context += result.output_ids
            known = len(context) - 1  # the last decoded token's KV is never computed
            if not turn.tool_result:
                break
            began = time.monotonic()
            if self.claim_policy is not None:
                claim_id = self._claim(session.session_id, t, context, turn.pause_s)
            time.sleep(max(0.0, turn.pause_s - (time.monotonic() - began)))  # the tool runs
            context += list(turn.tool_result)
        self._release(claim_id)

    # -- claims --------------------------------------------------------------------
    def _claim(self, session: int, turn: int, context: list[int], pause_s: float) -> str | None:
        assert self.claim_policy is not None
        blocks = len(context) // self.block_size
        if blocks == 0:
            return None
        body = {"prompt_token_ids": context[: blocks * self.block_size],
                "strength": self.claim_policy.strength, "demotable": self.claim_policy.demotable,
                "client_id": f"{self.tag}-agent{self.agent}"}
        if self.claim_policy.ttl_s is not None:
            body["ttl_s"] = self.claim_policy.ttl_s
        began, sent_at = time.monotonic(), time.time()
        reasons: list[str] = []

        def attempt(outcome: str) -> ClaimAttempt:
            return ClaimAttempt(session, turn, outcome, reasons, blocks, time.monotonic() - began,
                                sent_at, time.time(), body["prompt_token_ids"])

        while True:
            resp = self.ep.http.post(self.ep.base_url + "/v1/kv/claims", json=body, timeout=REQUEST_TIMEOUT)
            payload = resp.json()
            if resp.status_code in (200, 201):
                state = payload.get("state")
                outcome = "resident" if state == "resident" else f"failed:{state}"
                self.log.add("claims", attempt(outcome))
                return payload["claim_id"] if state == "resident" else None
            if resp.status_code != 409:
                raise RuntimeError(f"POST /v1/kv/claims answered {resp.status_code}: {str(payload)[:300]}")
            reasons.append(str((payload.get("error") or {}).get("reason")))
            decision = self.policy.after_claim_refused(len(reasons), pause_s - (time.monotonic() - began))
            if decision.action != "retry":
                self.log.add("claims", attempt("fallback"))
                return None
            time.sleep(decision.delay_s)

    def _release(self, claim_id: str | None) -> None:
        if claim_id is None:
            return
        resp = self.ep.http.delete(f"{self.ep.base_url}/v1/kv/claims/{claim_id}", timeout=60)
        if resp.status_code != 200:
            raise RuntimeError(f"DELETE claim {claim_id} answered {resp.status_code}: {resp.text[:200]}")


class BackgroundWorker:
    """A closed-loop one-shot client: sends its next unique prompt as soon as the last one
    is answered, until `stop`; a refused request is retried after the policy's back-off."""

    def __init__(self, ep: Endpoint, workload: Workload, worker: int, tag: str, log: SegmentLog,
                 policy: RefusalPolicy, stop: threading.Event) -> None:
        self.ep, self.workload, self.worker, self.tag, self.log = ep, workload, worker, tag, log
        self.policy, self.stop = policy, stop

    def run(self) -> None:
        index = 0
        try:
            while not self.stop.is_set():
                prompt, max_tokens = background_request(self.workload.params, self.worker, index)
                refusals = 0
                began = time.perf_counter()
                while not self.stop.is_set():
                    rid = f"{self.tag}-bg{self.worker}-{index}-a{refusals}"
                    resp = self.ep.http.post(self.ep.base_url + "/v1/completions",
                                             json=self.ep.body(prompt, max_tokens, rid), timeout=REQUEST_TIMEOUT)
                    if resp.status_code == 409:
                        refusals += 1
                        with self.log.lock:
                            self.log.background_refusals += 1
                        time.sleep(self.policy.backoff(1))
                        continue
                    if not resp.ok:
                        raise RuntimeError(f"background {rid}: HTTP {resp.status_code} {resp.text[:200]}")
                    usage = resp.json()["usage"]
                    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
                    self.log.add("background", BackgroundRecord(
                        self.worker, index, usage["prompt_tokens"], cached,
                        time.perf_counter() - began, time.time(), refusals))
                    break
                index += 1
        except Exception as exc:
            self.log.add("errors", f"background {self.worker}: {exc.__class__.__name__}: {exc}")


def as_dict(record) -> dict:
    out = asdict(record)
    out.pop("prompt_hash_key", None)
    return out
