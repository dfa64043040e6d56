"""No SGLang process outlives a failed start or a Ctrl-C. Uses the REAL SGLang server.

Skipped (tests/runtimes.py) when SGLang's venv is absent (`bash scripts/setup_sglang.sh` makes it). Each test
costs one (partial) server start. "The processes of this run" are the ones whose command
line or environment names this test's workdir (`RKV_SGLANG_WORKDIR`), plus every process
in their sessions (SGLang's scheduler and detokenizer retitle themselves), so another
SGLang on the same machine never counts.
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

from tests.runtimes import require_backend

pytestmark = require_backend("sglang")

from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.sglang.driver import SglangDriver  # noqa: E402
from pytest_rkv.drivers.sglang.server import MARKER_ENV  # noqa: E402
from pytest_rkv.errors import GeometryMismatch  # noqa: E402


REPO = Path(__file__).resolve().parents[2]


def run_processes(workdir: Path) -> list[int]:
    """Live pids of this workdir's server: marked processes and their sessions."""
    marked, sessions, everyone = set(), set(), {}
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().rsplit(b")", 1)[1].split()
            if stat[0] == b"Z":
                continue
            everyone[pid] = int(stat[3])  # the session id
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except (OSError, IndexError):
            continue
        if str(workdir).encode() in cmdline or f"{MARKER_ENV}={workdir}".encode() in environ:
            marked.add(pid)
            sessions.add(everyone[pid])
    return sorted(marked | {pid for pid, sid in everyone.items() if sid in sessions and sid != os.getsid(0)})


def assert_none_left(workdir: Path, grace: float = 5.0) -> None:
    deadline = time.monotonic() + grace
    while (left := run_processes(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"SGLang processes survived: {left}"


@pytest.fixture
def workdir(tmp_path):
    path = (tmp_path / "work").resolve()
    path.mkdir()
    yield path
    for pid in run_processes(path):  # last resort: never leak a 2 GB server into the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_wrong_pool_is_refused_and_the_running_server_stopped(workdir):
    """SGLang starts fine but builds a 40-page pool (a later flag overrides the driver's):
    the driver refuses it and stops the healthy server with all its processes."""
    driver = SglangDriver(DriverSettings(workdir=workdir, startup_timeout=900),
                          extra_server_args=("--max-total-tokens", "640"))
    with pytest.raises(GeometryMismatch, match="max_total_num_tokens is 640, expected 80 x 16 = 1280"):
        driver.start()
    assert "Application startup complete" in (workdir / "sglang-server.log").read_text(errors="replace")
    assert_none_left(workdir, grace=0)
    driver.stop()  # safe after a failed start
    driver.stop()  # and idempotent


INNER_TEST = textwrap.dedent('''
    import os, pathlib, time
    from pytest_rkv.drivers.base import DriverSettings
    from pytest_rkv.drivers.sglang.driver import SglangDriver

    def test_hold_a_server():
        workdir = pathlib.Path(os.environ["RKV_LIFECYCLE_WORKDIR"])
        driver = SglangDriver(DriverSettings(workdir=workdir, startup_timeout=900))
        driver.start()  # deliberately no try/finally: the driver's own backstops must act
        (workdir / "READY").write_text(str(driver.server.pid))
        time.sleep(900)
''')


def test_ctrl_c_while_the_server_starts_leaves_nothing(workdir):
    """Ctrl-C once SGLang has spawned its scheduler (the server is not ready yet)."""
    test_file = workdir.parent / "inner_hold_test.py"
    test_file.write_text(INNER_TEST)
    env = {**os.environ, "RKV_LIFECYCLE_WORKDIR": str(workdir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(test_file), "-q", "-s", "-p", "no:cacheprovider",
         "-p", "no:rkv", "--rootdir", str(test_file.parent)],
        cwd=test_file.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 600
        # supervisor + launcher + scheduler (+ detokenizer): the launcher has spawned children
        while len(run_processes(workdir)) < 4:
            assert inner.poll() is None, f"inner pytest exited early:\n{inner.stdout.read()}"
            assert time.monotonic() < deadline, "SGLang never spawned its scheduler"
            time.sleep(0.2)
        assert not (workdir / "READY").exists(), "too late: the server was already up"
        inner.send_signal(signal.SIGINT)  # what Ctrl-C delivers to pytest
        out, _ = inner.communicate(timeout=90)
    finally:
        if inner.poll() is None:
            inner.kill()
    assert "KeyboardInterrupt" in out, out
    assert_none_left(workdir)
