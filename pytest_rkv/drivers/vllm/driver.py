"""`vllm`: stock vLLM (no claim API), driven through its own surfaces.

Stock vLLM has prefix caching, KV cache events and request priority, but no claims.
The driver therefore implements only what vLLM really offers and keeps the base
class's `Unsupported` for claims, claim events, pool state and faults. That is what
makes its row come out "approximation substrate": the substrate tests (prefix reuse,
observable eviction, block events) have real evidence, the obligations do not.

What each contract call maps to:

* `complete` -> `POST /v1/completions` with token-id prompts; `cached_tokens` from
  `usage.prompt_tokens_details`; `rkv` is None (vLLM keeps no claim records).
* `complete_at_priority` -> the same with vLLM's `priority` field.
* `reset` -> `POST /reset_prefix_cache` (dev mode) until it succeeds, then checks
  that nothing runs, waits or holds KV.
* `block_events` -> the ZMQ KV event stream (events.py), seq-checked.
* `metrics` -> `/metrics` (metrics.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import requests

from pytest_rkv.contract import (
    Completion,
    CompletionRequest,
    Event,
    RuntimeInfo,
)
from pytest_rkv.adapters.vllm import PLUGIN_NAME as RKV_PLUGIN_NAME
from pytest_rkv.drivers import gpu
from pytest_rkv.drivers.base import Driver, DriverSettings, Reply
from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.drivers.vllm import build as build_mod
from pytest_rkv.drivers.vllm import geometry, hashing, metrics as metrics_mod, server as server_mod
from pytest_rkv.drivers.vllm.answers import completion_body, completion_from_vllm, error_from_vllm
from pytest_rkv.drivers.vllm.events import KvEventSubscriber
from pytest_rkv.drivers.vllm.model import ModelChoice, choose_model
from pytest_rkv.errors import HarnessError, NoAnswer, ProtocolViolation, ServerStartError, Unsupported

REQUEST_TIMEOUT = 120.0  # connect and non-completion calls; completions wait settings.refusal_timeout
RESET_TIMEOUT = 30.0


class VllmDriver(Driver):
    name = "vllm"
    depth = "none"
    requires = ("vllm", "msgspec", "zmq")

    def __init__(self, settings: DriverSettings, *, extra_server_args: tuple[str, ...] = ()) -> None:
        super().__init__(settings)
        self.extra_server_args = tuple(extra_server_args)
        self.server: ManagedProcess | None = None
        self.subscriber: KvEventSubscriber | None = None
        self.plan: server_mod.ServerPlan | None = None
        self.build: build_mod.Build | None = None
        self.model: ModelChoice | None = None
        self.block_size: int | None = None
        self.version: str | None = None
        self.pool_geometry: geometry.Geometry | None = None
        self.startup_seconds: float | None = None
        self.http = requests.Session()
        self._socket_dir: str | None = None
        self.gpu_baseline_mib: int | None = None
        self.gpu_release_problem: str | None = None

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        workdir = Path(self.settings.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.build = build_mod.detect()
        self.block_size = self.settings.block_size or self.build.default_block_size
        self.model = choose_model(self.settings.model, workdir, geometry.max_model_len(self.block_size))
        self.plan = server_mod.plan_server(
            build=self.build, model=self.model, block_size=self.block_size, workdir=workdir,
            port=server_mod.free_port(), replay_port=server_mod.free_port(),
            events_socket=self._events_socket(workdir), base_env=self._server_base_env(),
            extra_args=self.extra_server_args,
        )
        self.plan.log_path.unlink(missing_ok=True)  # the log tail must be this run's
        self.gpu_baseline_mib = gpu.used_mib()
        began = time.monotonic()
        try:
            self.server = server_mod.launch(self.plan, timeout=self.settings.startup_timeout)
        except ServerStartError as exc:
            self._remove_events_socket()
            self._cleanup_socket_dir()
            raise self._explained(exc) from None
        except BaseException:
            self._remove_events_socket()
            self._cleanup_socket_dir()
            raise
        try:
            self.startup_seconds = round(time.monotonic() - began, 1)
            self.subscriber = KvEventSubscriber(self.plan.events_endpoint, self.plan.replay_endpoint,
                                                topic=server_mod.EVENTS_TOPIC)
            self.subscriber.start()
            self.version = self._get_json("/version").get("version", "unknown")
            samples = metrics_mod.parse_samples(self._get_text("/metrics"))
            self.pool_geometry = geometry.verify(
                self.block_size, metrics_mod.cache_config(samples),
                self.plan.log_path.read_text(errors="replace"),
            )
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            subscriber.stop()
        if self.server is not None:
            self.server.stop()
            # The next row's server must get the whole GPU: wait for this one's memory.
            self.gpu_release_problem = gpu.wait_for_release(self.gpu_baseline_mib)
            if self.gpu_release_problem:
                warnings.warn(self.gpu_release_problem, stacklevel=2)
        self.http.close()
        self._remove_events_socket()
        self._cleanup_socket_dir()

    def check_alive(self) -> None:
        if self.server is not None:
            self.server.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines) if self.server is not None else ""

    def describe(self) -> dict:
        build = self.build
        return {
            "runtime": "vllm",
            "runtime_version": self.version,
            "build": build.build if build else None,
            "distribution": f"{build.dist}=={build.dist_version}" if build else None,
            "device": build.device if build else None,
            "torch_version": build.torch_version if build else None,
            "model": self.model.source if self.model else None,
            "model_generated": self.model.generated if self.model else None,
            "served_model_name": self.model.served_name if self.model else None,
            "block_size": self.block_size,
            "total_blocks": geometry.USABLE_BLOCKS,
            "geometry_verified_by": self.pool_geometry.source if self.pool_geometry else None,
            "startup_seconds": self.startup_seconds,
            "server_argv": list(self.plan.argv) if self.plan else None,
            "kv_events": self.plan.events_endpoint if self.plan else None,
            "vllm_plugins_allowlist": self.plan.env.get("VLLM_PLUGINS") if self.plan else None,
            "gpu_memory_used_before_start_mib": self.gpu_baseline_mib,
        }

    # -- RKV API v1 (what stock vLLM can answer) -------------------------------------------
    def info(self) -> RuntimeInfo:
        self._require_started()
        return RuntimeInfo(runtime="vllm", runtime_version=self.version or "unknown",
                           block_size=self.block_size, total_blocks=geometry.USABLE_BLOCKS,
                           fault_injection=False, demotion=False, routed=False)

    def reset(self) -> None:
        """Empty the prefix cache and prove nothing holds KV.

        `/reset_prefix_cache` answers `{"success": false}` while any block is referenced
        (a request still running), so it is retried. Success means every usable block is
        free and unhashed. The resulting `AllBlocksCleared` event arrives only after the
        next engine step and is not mapped to a contract event (see events.py)."""
        self._require_started()
        deadline = time.monotonic() + RESET_TIMEOUT
        while True:
            resp = self._request("POST", "/reset_prefix_cache", timeout=10)
            if resp.status_code == 404:
                raise HarnessError("vLLM offers no POST /reset_prefix_cache (VLLM_SERVER_DEV_MODE=1 "
                                   "missing?); tests cannot start from an empty pool")
            if resp.ok and resp.json().get("success") is True:
                break
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"vLLM refused to reset its prefix cache for {RESET_TIMEOUT:.0f}s "
                    f"(last answer {resp.status_code} {resp.text[:200]!r}); blocks are still held. "
                    f"Metrics: {self._pool_gauges()}"
                )
            time.sleep(0.25)
        self._verify_idle(deadline=time.monotonic() + 5.0)
        if self.subscriber is not None:
            self.subscriber.wait_settled()

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        return self._complete(req, priority=None)

    # -- lowering probes -------------------------------------------------------------
    def complete_at_priority(self, req: CompletionRequest, priority: int) -> Reply[Completion]:
        return self._complete(req, priority=priority)

    def metrics(self) -> dict[str, float]:
        self._require_started()
        return metrics_mod.metrics_dict(self._get_text("/metrics"))

    # -- substrate evidence ----------------------------------------------------------
    def block_events(self, after: int = 0) -> list[Event]:
        """vLLM's KV events with local seq > after, once the stream has settled."""
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
                f"vLLM's KV event stream lost batches with seq {named} and its replay socket "
                "did not return them; block-level evidence is incomplete"
            )
        return [e for e in sub.events() if e.seq > after]

    def expected_block_hashes(self, token_ids: list[int]) -> list[str]:
        """The `block_hashes` strings vLLM will report for these tokens (see hashing.py)."""
        self._require_started()
        return hashing.block_hash_strings(token_ids, self.block_size)

    # -- plumbing --------------------------------------------------------------------
    def _complete(self, req: CompletionRequest, priority: int | None) -> Reply[Completion]:
        self._require_started()
        if req.claim_id is not None:
            raise Unsupported("stock vLLM has no claims; a completion cannot name a claim_id")
        body = completion_body(req, self.model.served_name, priority)
        resp = self._request("POST", "/v1/completions", json=body, answer_wait=self.settings.refusal_timeout)
        if resp.status_code >= 500:
            self.check_alive()
        try:
            payload = resp.json()
        except ValueError:
            raise ProtocolViolation(
                f"vLLM answered {resp.status_code} to /v1/completions with a non-JSON body: {resp.text[:300]!r}"
            ) from None
        if resp.ok:
            return Reply(resp.status_code, value=completion_from_vllm(payload))
        return Reply(resp.status_code, error=error_from_vllm(resp.status_code, payload, req.request_id))

    def _request(self, method: str, path: str, *, timeout: float = REQUEST_TIMEOUT,
                 answer_wait: float | None = None, **kw) -> requests.Response:
        """One HTTP call to the server. With `answer_wait` (completions), a server that is
        alive but does not answer within that many seconds raises `NoAnswer`."""
        assert self.plan is not None
        try:
            return self.http.request(method, self.plan.base_url + path,
                                     timeout=(timeout, answer_wait) if answer_wait else timeout, **kw)
        except requests.ReadTimeout as exc:
            self.check_alive()
            if answer_wait is None:
                raise HarnessError(f"{method} {path} to vLLM failed: {exc.__class__.__name__}: {exc}") from None
            raise NoAnswer(answer_wait, f"{method} {path} sent; vLLM is alive but did not answer") from None
        except requests.RequestException as exc:
            self.check_alive()  # a crash becomes BackendCrashed with the log tail
            raise HarnessError(f"{method} {path} to vLLM failed: {exc.__class__.__name__}: {exc}") from None

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

    def _pool_gauges(self) -> dict[str, float]:
        m = metrics_mod.metrics_dict(self._get_text("/metrics"))
        keys = (metrics_mod.REQUESTS_RUNNING, metrics_mod.REQUESTS_WAITING, metrics_mod.KV_CACHE_USAGE)
        return {k: m.get(k, float("nan")) for k in keys}

    def _verify_idle(self, deadline: float) -> None:
        """Nothing running, nothing waiting, no KV in use. The gauges are refreshed per
        engine step, so a just-finished request may show for a moment: poll briefly."""
        while True:
            gauges = self._pool_gauges()
            if all(v == 0 for v in gauges.values()):
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"vLLM is not idle after a successful prefix-cache reset: {gauges}")
            time.sleep(0.2)

    def _require_started(self) -> None:
        if self.plan is None or self.server is None or self.block_size is None or self.model is None:
            raise HarnessError("the vllm driver was used before start() succeeded")

    def _events_socket(self, workdir: Path) -> Path:
        path = workdir / "vllm-kv-events.sock"
        if server_mod.ipc_path_fits(path):
            return path
        self._socket_dir = tempfile.mkdtemp(prefix="rkv-vllm-")
        return Path(self._socket_dir) / "kv.sock"

    def _server_base_env(self) -> dict[str, str]:
        """This process's environment, minus the RKV adapter plugin when the row is
        depth "none" (stock vLLM must not load the claim adapter by accident)."""
        if self.depth == "none":
            return server_mod.without_plugin(os.environ, RKV_PLUGIN_NAME)
        return dict(os.environ)

    def _remove_events_socket(self) -> None:
        """vLLM leaves its ipc:// socket file behind; it would litter the report dir."""
        if self.plan is not None and self.plan.events_endpoint.startswith("ipc://"):
            path = Path(self.plan.events_endpoint[len("ipc://"):])
            if path.is_socket() and (self.server is None or not self.server.running()):
                path.unlink(missing_ok=True)

    def _cleanup_socket_dir(self) -> None:
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _explained(self, exc: ServerStartError) -> ServerStartError:
        """The start error with vLLM's root cause (and a fix, when known) in front."""
        assert self.plan is not None
        log_text = self.plan.log_path.read_text(errors="replace") if self.plan.log_path.exists() else ""
        lines = []
        cause = server_mod.first_error(log_text)
        if cause:
            lines.append(f"vLLM's first error: {cause}")
        if "No common block size" in log_text and self.build is not None and self.build.on_cpu:
            lines.append(f"hint: block size {self.block_size} is not accepted by vLLM's CPU attention "
                         f"backend (it needs a multiple of {build_mod.CPU_BLOCK_SIZE}); use "
                         f"--rkv-block-size {build_mod.CPU_BLOCK_SIZE} or leave it unset")
        if not lines:
            return exc
        explained = ServerStartError("\n".join([*lines, str(exc)]))
        explained.log_tail = exc.log_tail
        return explained
