"""No vLLM process outlives a failed start or a Ctrl-C. Uses the REAL vLLM server.

Each test costs one (partial) server start, ~15-45 s on two CPU cores, so there are
three. Every process the driver's server spawns inherits `RKV_VLLM_WORKDIR=<workdir>`
(server.MARKER_ENV); the tests look processes up by that marker, so another vLLM on
the same machine (a concurrent suite run) cannot make them pass or fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("vllm")

from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.vllm import build  # noqa: E402
from pytest_rkv.drivers.vllm.driver import VllmDriver  # noqa: E402
from pytest_rkv.drivers.vllm.server import MARKER_ENV  # noqa: E402
from pytest_rkv.errors import ServerStartError  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def marked_processes(workdir: Path) -> list[psutil.Process]:
    """Live processes started for this workdir: by inherited marker, or by a command
    line naming the workdir (the api_server's --model path)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER_ENV) == str(workdir) or any(
                str(workdir) in arg for arg in (proc.info["cmdline"] or [])
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        try:
            out.append(f"pid {p.pid} pgid {os.getpgid(p.pid)} {' '.join(p.cmdline())[:160]}")
        except (psutil.Error, ProcessLookupError):
            pass
    return "\n".join(out)


def kill_leftovers(workdir: Path) -> None:
    """Last resort so a failing test does not leak a 2 GB server into the next one."""
    for proc in marked_processes(workdir):
        try:
            proc.kill()
        except psutil.Error:
            pass


def assert_none_left(workdir: Path, grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    while (left := marked_processes(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"vLLM processes survived:\n{describe(left)}"


@pytest.fixture
def workdir(tmp_path):
    path = (tmp_path / "work").resolve()
    path.mkdir()
    yield path
    kill_leftovers(path)


# -- (a) a start that fails after launch ------------------------------------------------------

def test_failed_start_raises_with_log_tail_and_leaves_nothing(workdir):
    """The server launches, spawns its engine, then dies on an impossible geometry."""
    if build.detect().on_cpu:
        # The CPU attention backend takes only multiples of 32: the engine core refuses.
        driver = VllmDriver(DriverSettings(workdir=workdir, block_size=16, startup_timeout=180))
        expected_in_log = "No common block size"
    else:
        # Two blocks cannot hold max_model_len: vLLM refuses while sizing the KV cache.
        driver = VllmDriver(DriverSettings(workdir=workdir, startup_timeout=180),
                            extra_server_args=("--num-gpu-blocks-override", "2"))
        expected_in_log = "num_gpu_blocks"
    with pytest.raises(ServerStartError) as caught:
        driver.start()
    message = str(caught.value)
    assert "vLLM server exited with code" in message
    assert "vllm.entrypoints.openai.api_server" in message  # the command is shown
    assert "vLLM's first error:" in message and expected_in_log in message, message  # the root cause
    assert caught.value.log_tail  # and the raw tail
    if expected_in_log == "No common block size":
        assert "multiple of 32" in message  # the driver's hint
    assert (workdir / "vllm-server.log").exists()
    assert_none_left(workdir, grace=0)
    driver.stop()  # safe after a failed start
    driver.stop()  # and idempotent


# -- (b) Ctrl-C of the pytest process that owns the driver -----------------------------------

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


def run_inner_pytest(tmp_path: Path, workdir: Path) -> subprocess.Popen:
    test_file = tmp_path / "inner_hold_test.py"
    test_file.write_text(INNER_TEST)
    env = {**os.environ, "RKV_LIFECYCLE_WORKDIR": str(workdir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-s", "-p", "no:cacheprovider",
         "-p", "no:rkv", "--rootdir", str(tmp_path)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
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


def engine_started(workdir: Path) -> bool:
    """True once vLLM has spawned its engine core (a process other than the api_server)."""
    return any("api_server" not in " ".join(p.cmdline()) for p in marked_processes(workdir)
               if p.is_running())


def interrupt_and_wait(inner: subprocess.Popen) -> str:
    inner.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground pytest
    try:
        out, _ = inner.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        inner.kill()
        out, _ = inner.communicate()
        pytest.fail(f"pytest did not exit within 90 s of SIGINT:\n{out}")
    return out


def test_ctrl_c_while_the_server_starts_leaves_nothing(tmp_path, workdir):
    inner = run_inner_pytest(tmp_path, workdir)
    try:
        wait_for(lambda: engine_started(workdir), 120, "the vLLM engine process", inner)
        assert not (workdir / "READY").exists(), "too late: the server was already up"
        out = interrupt_and_wait(inner)
    finally:
        if inner.poll() is None:
            inner.kill()
    assert "KeyboardInterrupt" in out, out
    assert_none_left(workdir)


def test_ctrl_c_while_the_server_runs_leaves_nothing(tmp_path, workdir):
    inner = run_inner_pytest(tmp_path, workdir)
    try:
        wait_for(lambda: (workdir / "READY").exists(), 240, "the vLLM server to be ready", inner)
        assert marked_processes(workdir), "the server should be running now"
        out = interrupt_and_wait(inner)
    finally:
        if inner.poll() is None:
            inner.kill()
    assert "KeyboardInterrupt" in out, out
    assert_none_left(workdir)
