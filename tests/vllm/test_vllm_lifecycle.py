"""No vLLM process outlives a failed start or a Ctrl-C. Uses the REAL vLLM server.

Each test costs one (partial) server start, ~15-45 s on two CPU cores, so there are
five, one per way a start or a run can end. "The processes of this run" are found three ways, so that another vLLM on the
same machine (a concurrent suite run) cannot make these tests pass or fail:

* the marker `RKV_VLLM_WORKDIR=<workdir>` every spawned process inherits
  (server.MARKER_ENV); vLLM's engine and worker rewrite their process title over
  /proc/<pid>/environ, so the marker alone misses them, hence also
* the session of any marked process (the server runs in its own session), and
* every `pid=N` vLLM wrote into this run's server log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.runtimes import require_backend  # noqa: E402

pytestmark = require_backend("vllm")
psutil = pytest.importorskip("psutil")  # comes with vLLM

from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.vllm import build  # noqa: E402
from pytest_rkv.drivers.vllm.driver import VllmDriver  # noqa: E402
from pytest_rkv.drivers.vllm.server import LOG_NAME, MARKER_ENV  # noqa: E402
from pytest_rkv.errors import GeometryMismatch, ServerStartError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
_LOGGED_PID = re.compile(r"\((?:APIServer|EngineCore|Worker|VllmWorker-\d+) pid=(\d+)\)")


class RunProcesses:
    """The live processes one server start created, however vLLM renamed them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.since = time.time()
        self.sessions: set[int] = set()

    def logged_pids(self) -> set[int]:
        try:
            return set(map(int, _LOGGED_PID.findall((self.workdir / LOG_NAME).read_text(errors="replace"))))
        except OSError:
            return set()

    def live(self) -> list[psutil.Process]:
        candidates = []
        for proc in psutil.process_iter(["pid", "cmdline", "status", "create_time"]):
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["create_time"] < self.since - 1:
                continue
            candidates.append(proc)
        for proc in candidates:  # learn the sessions first, from the marked processes
            try:
                if proc.environ().get(MARKER_ENV) == str(self.workdir):
                    self.sessions.add(os.getsid(proc.pid))
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        logged, found = self.logged_pids(), []
        for proc in candidates:
            try:
                if (proc.pid in logged or _sid(proc.pid) in self.sessions
                        or proc.environ().get(MARKER_ENV) == str(self.workdir)
                        or any(str(self.workdir) in arg for arg in (proc.info["cmdline"] or []))):
                    found.append(proc)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def engine_spawned(self) -> bool:
        return bool(re.search(r"\(EngineCore pid=\d+\)", _read(self.workdir / LOG_NAME)))

    def kill_all(self) -> None:
        """Last resort so a failing test does not leak a 2 GB server into the next one."""
        for proc in self.live():
            try:
                proc.kill()
            except psutil.Error:
                pass

    def assert_none_left(self, grace: float = 5.0) -> None:
        deadline = time.monotonic() + grace
        while (left := self.live()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"vLLM processes survived:\n{describe(left)}"


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"pid {p.pid} sid {_sid(p.pid)} {' '.join(p.cmdline())[:160]}")
        except psutil.Error:
            pass
    return "\n".join(out)


@pytest.fixture
def run(tmp_path):
    workdir = (tmp_path / "work").resolve()
    workdir.mkdir()
    processes = RunProcesses(workdir)
    yield processes
    processes.kill_all()


# -- (a) a start that fails after launch ------------------------------------------------------

def test_failed_start_raises_with_log_tail_and_leaves_nothing(run):
    """The server launches, spawns its engine, then dies on an impossible geometry."""
    if build.detect().on_cpu:
        # The CPU attention backend takes only multiples of 32: the engine core refuses.
        driver = VllmDriver(DriverSettings(workdir=run.workdir, block_size=16, startup_timeout=180))
        expected = "No common block size"
    else:
        # Two blocks cannot hold max_model_len: vLLM refuses while sizing the KV cache.
        driver = VllmDriver(DriverSettings(workdir=run.workdir, startup_timeout=180),
                            extra_server_args=("--num-gpu-blocks-override", "2"))
        expected = "num_gpu_blocks"
    with pytest.raises(ServerStartError) as caught:
        driver.start()
    message = str(caught.value)
    assert "vLLM server exited with code 1" in message
    assert "vllm.entrypoints.openai.api_server" in message  # the command is shown
    assert "vLLM's first error:" in message and expected in message, message  # the root cause
    assert caught.value.log_tail  # and the raw tail
    if expected == "No common block size":
        assert "multiple of 32" in message  # the driver's hint
    assert run.engine_spawned(), "the failure should come after vLLM spawned its engine"
    run.assert_none_left(grace=0)
    driver.stop()  # safe after a failed start
    driver.stop()  # and idempotent


def test_wrong_pool_is_refused_and_the_running_server_stopped(run):
    """vLLM starts fine but builds a 99-block pool (a later flag overrides the driver's
    81): the driver must refuse it (GeometryMismatch) and stop the healthy server."""
    driver = VllmDriver(DriverSettings(workdir=run.workdir, startup_timeout=180),
                        extra_server_args=("--num-gpu-blocks-override", "100"))
    with pytest.raises(GeometryMismatch, match="num_gpu_blocks is 100 \\(99 usable\\)"):
        driver.start()
    assert "Application startup complete" in _read(run.workdir / LOG_NAME), "it should have started"
    run.assert_none_left(grace=0)
    assert not (run.workdir / "vllm-kv-events.sock").exists()
    driver.stop()


# -- (b) Ctrl-C, and (c) kill -9, of the pytest process that owns the driver -------------------

INNER_TEST = textwrap.dedent('''
    import os, pathlib, time
    from pytest_rkv.drivers.base import DriverSettings
    from pytest_rkv.drivers.vllm.driver import VllmDriver

    def test_hold_a_server():
        workdir = pathlib.Path(os.environ["RKV_LIFECYCLE_WORKDIR"])
        driver = VllmDriver(DriverSettings(workdir=workdir))
        driver.start()  # deliberately no try/finally: the driver's own backstops must act
        (workdir / "READY").write_text(str(driver.server.pid))
        time.sleep(600)
''')


def start_inner_pytest(run: RunProcesses) -> subprocess.Popen:
    test_file = run.workdir.parent / "inner_hold_test.py"
    test_file.write_text(INNER_TEST)
    env = {**os.environ, "RKV_LIFECYCLE_WORKDIR": str(run.workdir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-s", "-p", "no:cacheprovider",
         "-p", "no:rkv", "--rootdir", str(test_file.parent)],
        cwd=test_file.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def wait_for(predicate, timeout: float, what: str, inner: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if inner.poll() is not None:
            pytest.fail(f"inner pytest exited early ({inner.returncode}) waiting for {what}:\n"
                        f"{inner.stdout.read()}")
        if time.monotonic() > deadline:
            inner.kill()
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def signal_and_wait(inner: subprocess.Popen, sig: int) -> str:
    inner.send_signal(sig)
    try:
        out, _ = inner.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        inner.kill()
        out, _ = inner.communicate()
        pytest.fail(f"pytest did not exit within 90 s of signal {sig}:\n{out}")
    return out


def test_ctrl_c_while_the_server_starts_leaves_nothing(run):
    inner = start_inner_pytest(run)
    try:
        wait_for(run.engine_spawned, 120, "vLLM to spawn its engine", inner)
        assert not (run.workdir / "READY").exists(), "too late: the server was already up"
        out = signal_and_wait(inner, signal.SIGINT)  # what Ctrl-C delivers to pytest
    finally:
        if inner.poll() is None:
            inner.kill()
    assert "KeyboardInterrupt" in out, out
    run.assert_none_left()


def test_ctrl_c_while_the_server_runs_leaves_nothing(run):
    inner = start_inner_pytest(run)
    try:
        wait_for(lambda: (run.workdir / "READY").exists(), 240, "the vLLM server to be ready", inner)
        assert len(run.live()) >= 3, f"expected server, engine and worker:\n{describe(run.live())}"
        out = signal_and_wait(inner, signal.SIGINT)
    finally:
        if inner.poll() is None:
            inner.kill()
    assert "KeyboardInterrupt" in out, out
    run.assert_none_left()


def test_kill_9_of_pytest_leaves_nothing(run):
    """No Python cleanup runs here; only the die-with-parent chain (PR_SET_PDEATHSIG on the
    supervisor, which then takes vLLM's engine and worker down) can act."""
    inner = start_inner_pytest(run)
    try:
        wait_for(lambda: (run.workdir / "READY").exists(), 240, "the vLLM server to be ready", inner)
        assert len(run.live()) >= 3, f"expected server, engine and worker:\n{describe(run.live())}"
        signal_and_wait(inner, signal.SIGKILL)
    finally:
        if inner.poll() is None:
            inner.kill()
    run.assert_none_left(grace=15)
