"""The supervisor every managed server runs under: helpers die with their owner.

Real processes, no vLLM: a stand-in "server" that, like vLLM's API server, spawns a helper.
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pytest_rkv.drivers.process import SUPERVISOR


def _orphan_maker(marker: str, exit_code: int = 0) -> list[str]:
    """A command that, like vLLM's API server, leaves a helper behind when it exits."""
    code = (f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(120)', '{marker}']); sys.exit({exit_code})")
    return [sys.executable, "-c", code]


def _helpers(marker: str, own_arg: bool = False) -> list[int]:
    """Live processes whose command line holds `marker` (the supervisor included), or with
    `own_arg` only those that have it as a whole argument (the helper itself)."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        hit = marker.encode() in args if own_arg else any(marker.encode() in arg for arg in args)
        if hit and state != "Z":
            found.append(int(pid))
    return found


def _gone(marker: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _helpers(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _helpers(marker)


@pytest.fixture
def marker():
    name = f"rkv-supervise-test-{uuid.uuid4().hex}"
    yield name
    for pid in _helpers(name):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux-only")
def test_supervisor_reaps_helpers_and_keeps_the_exit_code(marker):
    proc = subprocess.run([sys.executable, str(SUPERVISOR), "--", *_orphan_maker(marker, 3)],
                          start_new_session=True, timeout=60)
    assert proc.returncode == 3
    assert _gone(marker)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux-only")
def test_supervisor_takes_the_group_down_when_its_parent_is_killed(marker, tmp_path):
    """pytest -> (kill -9) ... the supervisor must still remove vLLM's helpers."""
    server_like = [sys.executable, "-c",  # spawns a helper, then keeps running
                   f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                   f"'import time; time.sleep(120)', '{marker}']); time.sleep(120)"]
    parent_code = (
        "import subprocess, sys; "
        f"subprocess.Popen({[sys.executable, str(SUPERVISOR), '--', *server_like]!r}, start_new_session=True); "
        "import time; time.sleep(120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        deadline = time.monotonic() + 20
        # Wait for the helper itself (the marker is its own argument), not for the supervisor:
        # the supervisor starts the server only after arming its parent-death signal, so a
        # kill before then would test nothing.
        while not _helpers(marker, own_arg=True):
            assert time.monotonic() < deadline, "the helper never started"
            time.sleep(0.05)
        parent.kill()  # like kill -9 of pytest: no Python cleanup anywhere
        parent.wait()
        assert _gone(marker), "the helper survived its owner's kill -9"
    finally:
        parent.kill()


def test_processes_for_finds_only_the_run_s_processes(tmp_path):
    """The leftover check of the live-row tests: a process is the run's when its environment
    names the run's report dir; a word filter narrows by command line."""

    from tests.runtimes import processes_for

    report = tmp_path / "report"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             env={**os.environ, "RKV_TEST_REPORT": str(report)})
    try:
        mine = processes_for(report)
        assert [line.split()[0] for line in mine] == [str(child.pid)]
        assert processes_for(report, b"time.sleep") == mine
        assert processes_for(report, b"no-such-word") == []
        assert processes_for(tmp_path / "other") == []
    finally:
        child.kill()
        child.wait()
    assert processes_for(report) == []
