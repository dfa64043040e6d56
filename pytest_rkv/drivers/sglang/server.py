"""The SGLang server command line and environment, and its launch.

`plan_server` is pure (argv and env from the driver's choices) so it can be unit-tested;
`launch` hands the plan to `ManagedProcess` (own process group, supervised by
`drivers/supervise.py`, stopped on a failed start, log captured).

Why each non-obvious flag is there:

* `--page-size 16 --max-total-tokens 1280`: the canonical pool, 80 pages of 16 tokens
  (SGLang keeps its padding slot outside the 1,280). `/server_info` confirms it at start.
* `--kv-events-config` with `"bind": true`: for a concrete host such as 127.0.0.1 the
  publisher otherwise *connects*, and a connecting PUB feeds nobody. Same wire format
  as vLLM's (`drivers/vllm/events.py`), with a replay ROUTER.
* `--enable-cache-report`: `meta_info.cached_tokens` per request.
* `--enable-streaming-session`: the streaming-session lowering probe needs it; requests
  outside a session are unaffected.
* `--enable-priority-scheduling --radix-eviction-policy priority --default-priority-value 0`:
  the request-priority lowering probe runs with the priority eviction policy (the tree
  evicts lower-priority prefixes first); requests without a priority all get 0, where the
  policy is plain LRU.
* CPU only (no real sgl-kernel in the environment): `SGLANG_USE_CPU_ENGINE=1 --device cpu
  --attention-backend torch_native --disable-cuda-graph`, and the import-only `sgl_kernel`
  stand-in first on PYTHONPATH (see environment.py); kernel calls, if any, are logged to
  `sgl-kernel-calls.log` in the workdir (and raise).
* `RKV_SGLANG_WORKDIR`: inherited by every process SGLang spawns (scheduler, detokenizer),
  so a test can find all of them without matching names another run might share.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.drivers.sglang.environment import STAND_IN_DIR, SglangEnvironment
from pytest_rkv.drivers.vllm.model import ModelChoice
from pytest_rkv.drivers.vllm.server import HOST

EVENTS_TOPIC = "kv"
MARKER_ENV = "RKV_SGLANG_WORKDIR"
KERNEL_CALL_LOG_ENV = "RKV_SGL_KERNEL_CALL_LOG"
LOG_NAME = "sglang-server.log"
KERNEL_CALL_LOG = "sgl-kernel-calls.log"
POOL_PAGES = 80
CONTEXT_LENGTH = 4096


@dataclass(frozen=True)
class ServerPlan:
    argv: list[str]
    env: dict[str, str]
    port: int
    events_endpoint: str
    replay_endpoint: str
    served_name: str
    page_size: int
    on_cpu: bool
    log_path: Path
    kernel_call_log: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def plan_server(
    *,
    environment: SglangEnvironment,
    model: ModelChoice,
    page_size: int,
    workdir: Path,
    port: int,
    events_port: int,
    replay_port: int,
    base_env: Mapping[str, str],
    extra_args: Sequence[str] = (),
) -> ServerPlan:
    on_cpu = environment.needs_kernel_stand_in
    events_endpoint = f"tcp://{HOST}:{events_port}"
    replay_endpoint = f"tcp://{HOST}:{replay_port}"
    kv_events = {"publisher": "zmq", "endpoint": events_endpoint, "bind": True,
                 "replay_endpoint": replay_endpoint, "topic": EVENTS_TOPIC}
    argv = [
        environment.python, "-m", "sglang.launch_server",
        "--model-path", model.source,
        "--served-model-name", model.served_name,
        "--host", HOST,
        "--port", str(port),
        "--page-size", str(page_size),
        "--max-total-tokens", str(POOL_PAGES * page_size),
        "--context-length", str(CONTEXT_LENGTH),
        "--enable-cache-report",
        "--enable-metrics",
        "--enable-streaming-session",
        "--enable-priority-scheduling",
        "--default-priority-value", "0",
        "--radix-eviction-policy", "priority",
        "--random-seed", "0",
        "--kv-events-config", json.dumps(kv_events, separators=(",", ":")),
    ]
    if model.generated:
        argv += ["--load-format", "dummy"]
    if on_cpu:
        argv += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph"]
    argv += list(extra_args)

    kernel_call_log = workdir / KERNEL_CALL_LOG
    env = dict(base_env)
    env.update({"PYTHONUNBUFFERED": "1", "SGLANG_DISABLE_REQUEST_LOGGING": "1",
                MARKER_ENV: str(workdir)})
    if model.local:
        env["HF_HUB_OFFLINE"] = "1"
    if on_cpu:
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(STAND_IN_DIR), env.get("PYTHONPATH")) if p)
        env[KERNEL_CALL_LOG_ENV] = str(kernel_call_log)
    return ServerPlan(argv=argv, env=env, port=port, events_endpoint=events_endpoint,
                      replay_endpoint=replay_endpoint, served_name=model.served_name,
                      page_size=page_size, on_cpu=on_cpu, log_path=workdir / LOG_NAME,
                      kernel_call_log=kernel_call_log)


_ERROR_LINE = re.compile(r"(?:^|\] |: )([A-Z]\w*(?:Error|Exception)): (.+)$", re.MULTILINE)


def first_error(log_text: str) -> str | None:
    """The first `SomeError: message` line of the server log (SGLang's scheduler logs the
    root cause; the launcher's own traceback that follows fills the tail)."""
    found = _ERROR_LINE.search(log_text)
    return f"{found.group(1)}: {found.group(2).strip()}" if found else None


def launch(plan: ServerPlan, timeout: float) -> ManagedProcess:
    """Start the server and wait for `GET /health` = 200. Raises ServerStartError (with
    the log tail) and leaves no process behind if it exits or does not get ready."""
    server = ManagedProcess(plan.argv, log_path=plan.log_path, env=plan.env, name="SGLang server")
    health = plan.base_url + "/health"

    def ready() -> bool:
        return requests.get(health, timeout=2).status_code == 200

    server.start(ready, timeout=timeout, poll=0.5)
    return server
