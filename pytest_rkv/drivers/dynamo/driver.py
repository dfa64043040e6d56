"""`dynamo`: stock Dynamo 1.6.1 (no claim API), a KV-routing frontend over two workers.

Dynamo has KV-aware routing, per-worker KV events and worker ids on every response, but
no claims. Like `vllm`, the driver implements only what Dynamo offers and keeps the base
class's `Unsupported` for claims, claim events, pool state and faults.

Two ways to send a completion, both through Dynamo's own frontend:

* `route(req)`: Dynamo's KV router chooses the worker; the answer names it
  (`nvext.worker_id`). This is what placement is about: the routed tests use it.
* `complete(req)` (the single-pool probe vocabulary): sent to the *home* worker (the
  first) with Dynamo's own placement hint, `nvext.backend_instance_id`. The canonical
  probe is written for one 80-block pool; routed freely, its 70-block request may land
  on the other, empty worker (the router breaks ties at random), and the same test
  would pass or fail by chance. describe() records the pin.

What each contract call maps to:

* `reset` -> a fresh deployment (the mocker has no prefix-cache reset): every pool and
  the router's index start empty; the namespace and the event log carry over.
* `complete_at_priority` -> `nvext.agent_hints.priority` (router queue order; the
  "agent priority as hard claim" lowering probe).
* `block_events` -> both workers' KV event streams (vLLM's wire format), merged with
  one seq; `worker_block_events(worker)` -> one worker's.
* `metrics` -> the frontend's `/metrics` (`dynamo_*` series).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import requests

from pytest_rkv.contract import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    Event,
    PromptTokensDetails,
    RuntimeInfo,
    Usage,
)
from pytest_rkv.drivers.base import Driver, DriverSettings, Reply, Routed
from pytest_rkv.drivers.dynamo import deploy, model
from pytest_rkv.drivers import netns
from pytest_rkv.drivers.netns import LoopbackNamespace
from pytest_rkv.drivers.vllm import metrics as metrics_mod
from pytest_rkv.drivers.vllm.answers import error_from_vllm
from pytest_rkv.drivers.vllm.events import KvEventSubscriber
from pytest_rkv.errors import BackendUnavailable, HarnessError, ProtocolViolation, ServerStartError, Unsupported

REQUEST_TIMEOUT = 60.0
EXTRA_FIELDS = ["worker_id", "timing"]


def routed_from_nvext(nvext: dict | None) -> Routed:
    """Where Dynamo served a completion: `nvext.worker_id` and `nvext.timing` of its answer
    (present when the request asked for them in `nvext.extra_fields`)."""
    nvext = nvext or {}
    ids = nvext.get("worker_id") or {}
    timing = nvext.get("timing") or {}
    return Routed(worker=_str_or_none(ids.get("prefill_worker_id")),
                  decode_worker=_str_or_none(ids.get("decode_worker_id")),
                  kv_hit_rate=timing.get("kv_hit_rate"))


class DynamoDriver(Driver):
    name = "dynamo"
    depth = "none"
    routed = True

    def __init__(self, settings: DriverSettings) -> None:
        super().__init__(settings)
        self.netns: LoopbackNamespace | None = None
        self.deployment: deploy.Deployment | None = None
        self.subscribers: list[KvEventSubscriber] = []
        self.http = requests.Session()
        self.python = deploy.venv_python()
        self.version: str | None = None
        self.model_dir: Path | None = None
        self.generation = 0
        self.startup_seconds: float | None = None
        self.redeploy_seconds: list[float] = []
        self._used = False  # a completion reached this deployment since it started
        # The merged block-event log: (worker id, event with the driver's seq).
        self._log: list[tuple[str, Event]] = []
        self._consumed: list[int] = []

    @classmethod
    def check_available(cls) -> None:
        """Dynamo lives in its own venv and needs a loopback-only network namespace."""
        why = deploy.missing_venv() or netns.unavailable()
        if why:
            raise BackendUnavailable(f"cannot run here: {why}")

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        if self.settings.block_size not in (None, deploy.BLOCK_SIZE):
            raise ServerStartError(f"the dynamo backend runs the mocker with block size {deploy.BLOCK_SIZE}; "
                                   f"--rkv-block-size {self.settings.block_size} is not supported")
        if self.settings.model:
            raise ServerStartError("the dynamo backend serves its generated tiny model; --rkv-model is not supported")
        why = deploy.missing_venv()
        if why:
            raise ServerStartError(f"cannot start Dynamo: {why}")
        workdir = Path(self.settings.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.version = deploy.dynamo_version(self.python)
        self.model_dir = model.write_model(workdir)
        began = time.monotonic()
        self.netns = LoopbackNamespace(workdir)
        try:
            self.netns.start()
            self._deploy()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = round(time.monotonic() - began, 1)

    def _deploy(self) -> None:
        assert self.netns is not None and self.model_dir is not None
        plan = deploy.plan_deployment(python=str(self.python), model_dir=self.model_dir,
                                      workdir=Path(self.settings.workdir).resolve(),
                                      base_env=os.environ, generation=self.generation)
        for wp in plan.workers:
            wp.log_path.unlink(missing_ok=True)
        plan.frontend.log_path.unlink(missing_ok=True)
        self.deployment = deploy.Deployment(plan, self.netns)
        self.deployment.start(self.settings.startup_timeout, self._frontend_ready)

        def subscribe() -> list[KvEventSubscriber]:  # in the namespace: ZMQ's threads inherit it
            subs = [KvEventSubscriber(wp.events_endpoint, wp.replay_endpoint) for wp in plan.workers]
            for sub in subs:
                sub.start()
            return subs

        self.subscribers = self.netns.call(subscribe)
        self._consumed = [0] * len(self.subscribers)
        self._used = False

    def _frontend_ready(self, worker_ids: list[str]) -> bool:
        health = self._get_json("/health", timeout=2)
        serving = {str(i["instance_id"]) for i in health.get("instances", []) if i.get("endpoint") == "generate"}
        models = {m.get("id") for m in self._get_json("/v1/models", timeout=2).get("data", [])}
        return serving == set(worker_ids) and model.SERVED_NAME in models

    def _teardown_deployment(self) -> None:
        subs, self.subscribers = self.subscribers, []
        for sub in subs:
            sub.stop()
        if self.deployment is not None:
            self.deployment.stop()

    def stop(self) -> None:
        self._teardown_deployment()
        if self.netns is not None:
            self.netns.stop()
        self.http.close()

    def check_alive(self) -> None:
        if self.deployment is not None:
            self.deployment.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        return self.deployment.log_tail(lines) if self.deployment is not None else ""

    @property
    def worker_ids(self) -> list[str]:
        return list(self.deployment.worker_ids) if self.deployment else []

    def workers(self) -> list[str]:
        self._require_started()
        return self.worker_ids

    @property
    def home_worker(self) -> str:
        self._require_started()
        return self.worker_ids[0]

    def describe(self) -> dict:
        plan = self.deployment.plan if self.deployment else None
        return {
            "runtime": "dynamo",
            "runtime_version": self.version,
            "distribution": f"ai-dynamo=={self.version}" if self.version else None,
            "engine": "dynamo.mocker (Rust engine simulator)",
            "workers": len(plan.workers) if plan else None,
            "worker_ids": self.worker_ids,
            "router": "dynamo.frontend --router-mode kv",
            "single_pool_probes_pinned_to": "worker 0 via nvext.backend_instance_id (Dynamo's own hint)",
            "reset": "a fresh deployment per test (the mocker has no prefix-cache reset)",
            "network": "a loopback-only network namespace (unshare -n)",
            "block_size": deploy.BLOCK_SIZE,
            "total_blocks_per_worker": deploy.POOL_BLOCKS,
            "model": "generated tiny Llama config + word-level tokenizer",
            "startup_seconds": self.startup_seconds,
            "frontend_argv": _neutral(plan.frontend.argv) if plan else None,
            "worker_argv": _neutral(plan.workers[0].argv) if plan else None,
            "kv_events": [wp.events_endpoint for wp in plan.workers] if plan else None,
        }

    # -- RKV API v1 (what stock Dynamo can answer) -----------------------------------
    def info(self) -> RuntimeInfo:
        self._require_started()
        return RuntimeInfo(runtime="dynamo", runtime_version=self.version or "unknown",
                           block_size=deploy.BLOCK_SIZE, total_blocks=deploy.POOL_BLOCKS,
                           fault_injection=False, demotion=False, routed=True)

    def reset(self) -> None:
        """A fresh deployment: empty pools and an empty router index, by construction.
        Events the old workers published are kept (seq keeps increasing). A deployment
        no completion has reached since it started is still empty and is kept."""
        self._require_started()
        self._collect()
        if not self._used:
            return
        began = time.monotonic()
        self._teardown_deployment()
        self.generation += 1
        self._deploy()
        self.redeploy_seconds.append(round(time.monotonic() - began, 2))

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        return self._send(req, home=True)[0]

    def route(self, req: CompletionRequest, worker: str | None = None) -> tuple[Reply[Completion], Routed]:
        """A completion whose worker Dynamo's KV router chooses (or `worker`, forced with
        Dynamo's own hint), and where it was served."""
        return self._send(req, home=False, worker=worker)

    def complete_at_priority(self, req: CompletionRequest, priority: int) -> Reply[Completion]:
        return self._send(req, home=True, priority=priority)[0]

    def metrics(self) -> dict[str, float]:
        self._require_started()
        samples = metrics_mod.parse_samples(self._get_text("/metrics"))
        return {metrics_mod.sample_key(s.name, s.labels): s.value for s in samples
                if s.name.startswith("dynamo_") and not s.name.endswith(("_bucket", "_created"))}

    # -- substrate evidence ----------------------------------------------------------
    def block_events(self, after: int = 0) -> list[Event]:
        self._require_started()
        self._collect()
        return [e for _, e in self._log if e.seq > after]

    def worker_block_events(self, worker: str, after: int = 0) -> list[Event]:
        self._require_started()
        self._collect()
        return [e for w, e in self._log if w == worker and e.seq > after]

    # -- plumbing --------------------------------------------------------------------
    def _collect(self) -> None:
        for i, sub in enumerate(self.subscribers):
            sub.wait_settled()
            if sub.error is not None:
                raise HarnessError(f"the KV event subscriber of worker {i} failed: {sub.error!r}")
            if sub.unfilled_gaps:
                raise ProtocolViolation(f"worker {i}'s KV event stream lost batches {sub.unfilled_gaps} "
                                        "and its replay socket did not return them")
            new = sub.events()[self._consumed[i]:]
            self._consumed[i] += len(new)
            for event in new:
                seq = (self._log[-1][1].seq if self._log else 0) + 1
                self._log.append((self.worker_ids[i], event.model_copy(update={"seq": seq})))

    def _send(self, req: CompletionRequest, *, home: bool, worker: str | None = None,
              priority: int | None = None) -> tuple[Reply[Completion], Routed]:
        self._require_started()
        if req.claim_id is not None:
            raise Unsupported("stock Dynamo has no claims; a completion cannot name a claim_id")
        nvext: dict = {"extra_fields": EXTRA_FIELDS}
        forced = self.home_worker if home else worker
        if forced is not None:
            nvext["backend_instance_id"] = int(forced)
        if priority is not None:
            nvext["agent_hints"] = {"priority": priority}
        self._used = True
        body = {"model": req.model or model.SERVED_NAME, "prompt": list(req.prompt),
                "max_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True, "nvext": nvext}
        resp = self._request("POST", "/v1/completions", json=body, timeout=REQUEST_TIMEOUT)
        if resp.status_code >= 500:
            self.check_alive()
        try:
            payload = resp.json()
        except ValueError:
            raise ProtocolViolation(f"Dynamo answered {resp.status_code} to /v1/completions with a "
                                    f"non-JSON body: {resp.text[:300]!r}") from None
        if not resp.ok:
            return Reply(resp.status_code, error=error_from_vllm(resp.status_code, payload, req.request_id)), routed_from_nvext(None)
        routed = routed_from_nvext(payload.get("nvext"))
        if forced is not None and routed.worker != forced:
            raise ProtocolViolation(f"Dynamo served a request forced to worker {forced} on worker {routed.worker}")
        return Reply(resp.status_code, value=completion_from_dynamo(payload)), routed

    def _request(self, method: str, path: str, *, timeout: float, **kw) -> requests.Response:
        if self.deployment is None or self.netns is None:
            raise HarnessError("the dynamo driver was used before start() succeeded")
        url = self.deployment.plan.base_url + path
        try:
            return self.netns.call(self.http.request, method, url, timeout=timeout, **kw)
        except requests.RequestException as exc:
            self.check_alive()
            raise HarnessError(f"{method} {path} to Dynamo failed: {exc.__class__.__name__}: {exc}") from None

    def _get_text(self, path: str, timeout: float = 10) -> str:
        resp = self._request("GET", path, timeout=timeout)
        if not resp.ok:
            raise HarnessError(f"GET {path} answered {resp.status_code}: {resp.text[:200]!r}")
        return resp.text

    def _get_json(self, path: str, timeout: float = 10) -> dict:
        resp = self._request("GET", path, timeout=timeout)
        if not resp.ok:
            raise HarnessError(f"GET {path} answered {resp.status_code}: {resp.text[:200]!r}")
        return resp.json()

    def _require_started(self) -> None:
        if self.deployment is None or len(self.worker_ids) != deploy.WORKERS:
            raise HarnessError("the dynamo driver was used before start() succeeded")


def completion_from_dynamo(payload: dict) -> Completion:
    try:
        usage = payload["usage"]
        details = usage.get("prompt_tokens_details") or {}
        if details.get("cached_tokens") is None:
            raise ProtocolViolation("Dynamo answered without usage.prompt_tokens_details.cached_tokens")
        return Completion(
            id=payload["id"], model=payload["model"],
            choices=[CompletionChoice(index=c.get("index", 0), text=c.get("text") or "",
                                      finish_reason=c.get("finish_reason") or "length")
                     for c in payload["choices"]],
            usage=Usage(prompt_tokens=usage["prompt_tokens"], completion_tokens=usage.get("completion_tokens") or 0,
                        total_tokens=usage["total_tokens"],
                        prompt_tokens_details=PromptTokensDetails(cached_tokens=details["cached_tokens"])),
            rkv=None,
        )
    except (KeyError, TypeError) as exc:
        raise ProtocolViolation(f"Dynamo completion lacks {exc}: {str(payload)[:300]}") from None


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _neutral(argv: list[str]) -> list[str]:
    """Machine paths replaced by neutral names, so recorded evidence is the same everywhere."""
    out = []
    for arg in argv:
        if arg.endswith("/bin/python"):
            out.append("<dynamo-venv>/bin/python")
        elif arg.endswith(model.DIRNAME):
            out.append(f"<workdir>/{model.DIRNAME}")
        else:
            out.append(arg)
    return out
