"""`sglang`: stock SGLang (no claim API), driven through its native HTTP surfaces.

Like `vllm`, the driver implements only what SGLang offers and keeps the base class's
`Unsupported` for claims, claim events, pool state and faults, so the row is earned by
the substrate tests (prefix reuse, observable eviction, block events) and the lowering
probes, never by the obligations.

What each contract call maps to:

* `complete` -> `POST /generate` with `input_ids`; `cached_tokens` from `meta_info`.
  Unanswered after `settings.refusal_timeout` s while the server lives: the request is
  aborted (`/abort_request`) and `NoAnswer` raised (SGLang queues what it cannot admit).
* `complete_at_priority` -> the same with SGLang's `priority` (SGLang favours HIGHER
  values, the contract lower ones: the sign is flipped).
* `complete_in_held_session` -> a turn in a streaming session (`/open_session`,
  `session_params`), which keeps the turn's KV locked until `close_held_sessions` or its
  idle timeout: the streaming-session lowering probe.
* `reset` -> closes held sessions, then `POST /flush_cache` until it succeeds (SGLang
  refuses while requests run or wait).
* `block_events` -> the ZMQ KV event stream (vLLM's wire format), seq-checked.
* `metrics` -> `/metrics`, the `sglang:` series.

The last page is recomputed: SGLang follows the contract's last-block rule
(`contract.servable_blocks`) with its page as the block. It serves at most
`len(prompt) - 1` prompt tokens from cache (the last token must be computed to produce
logits), in whole pages, so a prompt of exactly n pages repeated hits (n - 1) pages
(measured: 944 of 960 tokens at page 16). The suite's reuse queries add one token, so a full hit of an n-page
prefix reads n * page exactly. No tolerance: `complete` checks every answer against the
rule, and a count above it (or not in whole pages) is a protocol violation.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import requests

from pytest_rkv.contract import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorBody,
    Event,
    PromptTokensDetails,
    RuntimeInfo,
    Usage,
    servable_blocks,
)
from pytest_rkv.drivers.base import Driver, DriverSettings, Reply
from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.drivers.sglang import environment as env_mod
from pytest_rkv.drivers.sglang import server as server_mod
from pytest_rkv.drivers.sglang.model import choose_model
from pytest_rkv.drivers.vllm import metrics as metrics_mod
from pytest_rkv.drivers.vllm.events import KvEventSubscriber
from pytest_rkv.drivers.vllm.model import ModelChoice
from pytest_rkv.drivers.vllm.server import free_port
from pytest_rkv.errors import (
    BackendUnavailable,
    GeometryMismatch,
    HarnessError,
    NoAnswer,
    ProtocolViolation,
    ServerStartError,
    Unsupported,
)
from pytest_rkv.provenance import distribution_facts

DEFAULT_PAGE_SIZE = 16
RESET_TIMEOUT = 30.0
# A held session outlives the bounded wait by this much, so the probe's wait ends by the
# driver's bound, not by SGLang's idle timeout; if closing it ever fails, SGLang still
# releases it on its own.
SESSION_TIMEOUT_MARGIN = 60.0
_CAPACITY = ("longer than", "context length", "exceeds the maximum", "too long")


def max_cached_tokens(prompt_tokens: int, page_size: int) -> int:
    """The most prompt tokens SGLang can serve from cache (the last-block rule, in tokens)."""
    return servable_blocks(prompt_tokens, page_size) * page_size


class SglangDriver(Driver):
    name = "sglang"
    depth = "none"

    def __init__(self, settings: DriverSettings, *, extra_server_args: tuple[str, ...] = ()) -> None:
        super().__init__(settings)
        self.extra_server_args = tuple(extra_server_args)
        self.environment: env_mod.SglangEnvironment | None = None
        self.server: ManagedProcess | None = None
        self.subscriber: KvEventSubscriber | None = None
        self.plan: server_mod.ServerPlan | None = None
        self.model: ModelChoice | None = None
        self.page_size: int | None = None
        self.version: str | None = None
        self.geometry: dict | None = None
        self.startup_seconds: float | None = None
        self.http = requests.Session()
        self._sessions: list[str] = []
        self._distribution: dict | None = None

    @classmethod
    def check_available(cls) -> None:
        """SGLang lives in its own interpreter: that interpreter must exist (its contents
        are checked at start, where a failure carries SGLang's own words)."""
        try:
            env_mod.find_python()
        except env_mod.SglangMissing as exc:
            raise BackendUnavailable(str(exc)) from None

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        workdir = Path(self.settings.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.environment = env_mod.inspect(env_mod.find_python())
        self._distribution = distribution_facts("sglang", python=self.environment.python)
        self.page_size = self.settings.block_size or DEFAULT_PAGE_SIZE
        self.model = choose_model(self.settings.model, workdir, server_mod.CONTEXT_LENGTH)
        self.plan = server_mod.plan_server(
            environment=self.environment, model=self.model, page_size=self.page_size,
            workdir=workdir, port=free_port(), events_port=free_port(), replay_port=free_port(),
            base_env=os.environ, extra_args=self.extra_server_args,
        )
        self.plan.log_path.unlink(missing_ok=True)  # the log tail must be this run's
        self.plan.kernel_call_log.unlink(missing_ok=True)
        began = time.monotonic()
        try:
            self.server = server_mod.launch(self.plan, timeout=self.settings.startup_timeout)
        except ServerStartError as exc:
            raise self._explained(exc) from None
        try:
            self.startup_seconds = round(time.monotonic() - began, 1)
            self.subscriber = KvEventSubscriber(self.plan.events_endpoint, self.plan.replay_endpoint,
                                                topic=server_mod.EVENTS_TOPIC)
            self.subscriber.start()
            info = self._get_json("/server_info")
            self.version = str(info.get("version", "unknown"))
            self.geometry = verify_geometry(info, self.page_size)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.stop()
        if self.server is not None:
            self.server.stop()
        self._sessions.clear()
        self.http.close()

    def check_alive(self) -> None:
        if self.server is not None:
            self.server.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines) if self.server is not None else ""

    def describe(self) -> dict:
        env, plan = self.environment, self.plan
        return {
            "runtime": "sglang",
            "runtime_version": self.version,
            "distribution": self._distribution or (f"sglang=={env.sglang_version}" if env else None),
            "device": ("cpu" if plan.on_cpu else "gpu") if plan else None,
            "torch_version": env.torch_version if env else None,
            "python": env.python if env else None,
            "stand_ins": env.stand_ins() if env else None,
            "sgl_kernel_calls": self.kernel_calls(),
            "model": self.model.source if self.model else None,
            "model_generated": self.model.generated if self.model else None,
            "served_model_name": self.model.served_name if self.model else None,
            "block_size": self.page_size,
            "total_blocks": server_mod.POOL_PAGES,
            "geometry_verified_by": "/server_info" if self.geometry else None,
            "geometry": self.geometry,
            "last_page_rule": "a repeated prompt of n full pages hits (n - 1) pages; the last token is always computed",
            "startup_seconds": self.startup_seconds,
            "server_argv": list(plan.argv) if plan else None,
            "kv_events": plan.events_endpoint if plan else None,
        }

    def kernel_calls(self) -> list[str] | None:
        """sgl_kernel stand-in calls logged by the server (each one also raised there)."""
        if self.plan is None or not self.plan.on_cpu:
            return None
        try:
            return self.plan.kernel_call_log.read_text().split()
        except OSError:
            return []

    # -- RKV API v1 (what stock SGLang can answer) -------------------------------------
    def info(self) -> RuntimeInfo:
        self._require_started()
        return RuntimeInfo(runtime="sglang", runtime_version=self.version or "unknown",
                           block_size=self.page_size, total_blocks=server_mod.POOL_PAGES,
                           fault_injection=False, demotion=False, routed=False)

    def reset(self) -> None:
        """Close held sessions, then empty the radix cache. `/flush_cache` answers 400
        while any request runs or waits (e.g. one being aborted), so it is retried; its
        success is SGLang's statement that the scheduler was idle and the tree is empty."""
        self._require_started()
        self.close_held_sessions()
        deadline = time.monotonic() + RESET_TIMEOUT
        while True:
            resp = self._request("POST", "/flush_cache", timeout=10)
            if resp.ok:
                break
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"SGLang refused to flush its cache for {RESET_TIMEOUT:.0f}s (last answer "
                    f"{resp.status_code} {resp.text[:200]!r}); requests are still queued or running"
                )
            time.sleep(0.25)
        if self.subscriber is not None:
            self.subscriber.wait_settled()

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        return self._complete(req)

    # -- lowering probes -------------------------------------------------------------
    def complete_at_priority(self, req: CompletionRequest, priority: int) -> Reply[Completion]:
        return self._complete(req, priority=-priority)

    def complete_in_held_session(self, req: CompletionRequest) -> Reply[Completion]:
        self._require_started()
        timeout = self.settings.refusal_timeout + SESSION_TIMEOUT_MARGIN
        resp = self._request("POST", "/open_session", timeout=30, json={
            "capacity_of_str_len": 1_000_000, "streaming": True, "timeout": timeout})
        if not resp.ok:
            raise HarnessError(f"SGLang did not open a streaming session: {resp.status_code} {resp.text[:200]!r}")
        session_id = resp.json()
        self._sessions.append(session_id)
        return self._complete(req, session_id=session_id)

    def close_held_sessions(self) -> None:
        while self._sessions:
            session_id = self._sessions[-1]
            resp = self._request("POST", "/close_session", timeout=30, json={"session_id": session_id})
            if not resp.ok:
                raise HarnessError(f"SGLang did not close session {session_id}: {resp.status_code} {resp.text[:200]!r}")
            self._sessions.pop()

    def metrics(self) -> dict[str, float]:
        self._require_started()
        return metrics_mod.metrics_dict(self._get_text("/metrics"), prefix="sglang:")

    # -- substrate evidence ----------------------------------------------------------
    def block_events(self, after: int = 0) -> list[Event]:
        self._require_started()
        sub = self.subscriber
        assert sub is not None
        sub.wait_settled()
        if sub.error is not None:
            raise HarnessError(f"the KV event subscriber failed: {sub.error!r}")
        gaps = sub.unfilled_gaps
        if gaps:
            named = ", ".join(f"{a}" if a == b else f"{a}..{b}" for a, b in gaps)
            raise ProtocolViolation(
                f"SGLang's KV event stream lost batches with seq {named} and its replay socket "
                "did not return them; block-level evidence is incomplete"
            )
        return [e for e in sub.events() if e.seq > after]

    # -- plumbing --------------------------------------------------------------------
    def _complete(self, req: CompletionRequest, *, priority: int | None = None,
                  session_id: str | None = None) -> Reply[Completion]:
        self._require_started()
        if req.claim_id is not None:
            raise Unsupported("stock SGLang has no claims; a completion cannot name a claim_id")
        rid = req.request_id or f"rkv-{uuid.uuid4().hex}"
        body = generate_body(req, rid, priority=priority, session_id=session_id)
        wait = self.settings.refusal_timeout
        began = time.monotonic()
        try:
            resp = self.http.post(self.plan.base_url + "/generate", json=body, timeout=(5, wait))
        except requests.Timeout:
            self.check_alive()
            self._request("POST", "/abort_request", timeout=10, json={"rid": rid})
            raise NoAnswer(round(time.monotonic() - began, 1),
                           f"SGLang kept request {rid} ({len(req.prompt)} prompt tokens) waiting, "
                           "with no answer, no refusal and no error; the request was then aborted") from None
        except requests.RequestException as exc:
            self.check_alive()
            raise HarnessError(f"POST /generate to SGLang failed: {exc.__class__.__name__}: {exc}") from None
        if resp.status_code >= 500:
            self.check_alive()
        try:
            payload = resp.json()
        except ValueError:
            raise ProtocolViolation(
                f"SGLang answered {resp.status_code} to /generate with a non-JSON body: {resp.text[:300]!r}"
            ) from None
        if not resp.ok:
            return Reply(resp.status_code, error=error_from_sglang(resp.status_code, payload, req.request_id))
        completion = completion_from_sglang(payload, self.model.served_name)
        check_cached_tokens(completion, self.page_size)
        return Reply(resp.status_code, value=completion)

    def _request(self, method: str, path: str, *, timeout: float, **kw) -> requests.Response:
        assert self.plan is not None
        try:
            return self.http.request(method, self.plan.base_url + path, timeout=timeout, **kw)
        except requests.RequestException as exc:
            self.check_alive()
            raise HarnessError(f"{method} {path} to SGLang failed: {exc.__class__.__name__}: {exc}") from None

    def _get_text(self, path: str) -> str:
        resp = self._request("GET", path, timeout=10)
        if not resp.ok:
            raise HarnessError(f"GET {path} answered {resp.status_code}: {resp.text[:200]!r}")
        return resp.text

    def _get_json(self, path: str) -> dict:
        resp = self._request("GET", path, timeout=10)
        if not resp.ok:
            raise HarnessError(f"GET {path} answered {resp.status_code}: {resp.text[:200]!r}")
        return resp.json()

    def _require_started(self) -> None:
        if self.plan is None or self.server is None or self.page_size is None or self.model is None:
            raise HarnessError("the sglang driver was used before start() succeeded")

    def _explained(self, exc: ServerStartError) -> ServerStartError:
        """The start error with SGLang's root cause in front (and the stand-in named when
        a kernel was called)."""
        assert self.plan is not None
        log_text = self.plan.log_path.read_text(errors="replace") if self.plan.log_path.exists() else ""
        lines = []
        cause = server_mod.first_error(log_text)
        if cause:
            lines.append(f"SGLang's first error: {cause}")
        if self.kernel_calls():
            lines.append(f"SGLang called sgl_kernel kernels the CPU stand-in cannot provide: {self.kernel_calls()}")
        if not lines:
            return exc
        explained = ServerStartError("\n".join([*lines, str(exc)]))
        explained.log_tail = exc.log_tail
        return explained


# -- request/response mapping (pure) -------------------------------------------------------


def generate_body(req: CompletionRequest, rid: str, *, priority: int | None = None,
                  session_id: str | None = None) -> dict:
    """The `/generate` request for a contract completion. `temperature` 0 and `ignore_eos`
    make the output exactly `max_tokens` long (dummy weights may emit EOS at random)."""
    body: dict = {
        "input_ids": list(req.prompt),
        "sampling_params": {"max_new_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True},
        "rid": rid,
    }
    if priority is not None:
        body["priority"] = priority
    if session_id is not None:
        body["session_params"] = {"id": session_id}
    return body


def completion_from_sglang(payload: dict, served_name: str) -> Completion:
    try:
        meta = payload["meta_info"]
        finish = meta.get("finish_reason")
        reason = finish.get("type") if isinstance(finish, dict) else (finish or "length")
        if meta.get("cached_tokens") is None:
            raise HarnessError("SGLang answered without meta_info.cached_tokens; the server must run "
                               "with --enable-cache-report")
        prompt, completion = meta["prompt_tokens"], meta["completion_tokens"]
        return Completion(
            id=str(meta["id"]),
            model=served_name,
            choices=[CompletionChoice(index=0, text=payload.get("text") or "",
                                      token_ids=list(payload.get("output_ids") or []),
                                      finish_reason=reason)],
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion,
                        total_tokens=prompt + completion,
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=meta["cached_tokens"])),
            rkv=None,
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ProtocolViolation(f"SGLang /generate answer lacks {exc}: {str(payload)[:300]}") from None


def check_cached_tokens(completion: Completion, page_size: int) -> None:
    """The last-page rule, exactly: whole pages, and never the prompt's last token."""
    usage = completion.usage
    cached = usage.prompt_tokens_details.cached_tokens
    limit = max_cached_tokens(usage.prompt_tokens, page_size)
    if cached % page_size or cached > limit:
        raise ProtocolViolation(
            f"SGLang reported {cached} cached tokens for a {usage.prompt_tokens}-token prompt; with "
            f"page size {page_size} a hit is whole pages and at most {limit} tokens (the last token "
            "is always computed)"
        )


def error_from_sglang(status: int, payload: dict, request_id: str | None = None) -> ErrorBody:
    """A contract error for an SGLang error answer (`{"error": {"message", ...}}` or
    `{"object": "error", "message", ...}`). A prompt SGLang can never fit is `capacity`."""
    error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    message = str(error.get("message") or f"HTTP {status}")
    kind = "capacity" if status == 400 and any(s in message.lower() for s in _CAPACITY) else "invalid_request"
    sglang_type = error.get("type")
    return ErrorBody(type=kind, message=message, reason=str(sglang_type) if sglang_type else None,
                     request_id=request_id)


def verify_geometry(server_info: dict, page_size: int) -> dict:
    """The pool SGLang says it built (`/server_info`), or GeometryMismatch: the probes are
    arithmetic on 80 pages, and another pool would make their outcomes meaningless."""
    states = server_info.get("internal_states") or [{}]
    total = server_info.get("max_total_num_tokens", states[0].get("max_total_num_tokens"))
    size = server_info.get("page_size", states[0].get("page_size"))
    expected = server_mod.POOL_PAGES * page_size
    problems = []
    if total is None or size is None:
        problems.append(f"/server_info has no max_total_num_tokens/page_size (keys: {sorted(server_info)[:40]})")
    else:
        if int(size) != page_size:
            problems.append(f"page_size is {size}, the driver asked for {page_size}")
        if int(total) != expected:
            problems.append(f"max_total_num_tokens is {total}, expected {server_mod.POOL_PAGES} x {page_size} = {expected}")
    if problems:
        raise GeometryMismatch(
            f"SGLang did not build the {server_mod.POOL_PAGES}-page pool at page size {page_size} "
            "the probes are written for: " + "; ".join(problems)
        )
    return {"max_total_num_tokens": int(total), "page_size": int(size)}
