"""No Dynamo process, and no network namespace, outlives a run, a failed start or a
killed pytest. Uses the REAL Dynamo deployment (frontend + 2 mocker workers, ~5 s).

"The processes of this run" are those whose environment carries this run's marker
(`RKV_DYNAMO_WORKDIR=<workdir>`, deploy.MARKER_ENV) or, for the namespace holder,
`RKV_NETNS_WORKDIR=<workdir>`: other helpers' Dynamo servers on this machine never count.
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

pytestmark = require_backend("dynamo")

from pytest_rkv.drivers import netns  # noqa: E402
from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.dynamo import deploy  # noqa: E402
from pytest_rkv.drivers.dynamo.driver import DynamoDriver  # noqa: E402
from pytest_rkv.errors import ServerStartError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def run_processes(workdir: Path) -> list[str]:
    """Live processes of this run: `pid cmdline` lines."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
            marked = any(f"{key}={workdir}".encode() in environ for key in (deploy.MARKER_ENV, netns.MARKER_ENV))
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and (marked or str(workdir) in cmd):
            found.append(f"{pid} {cmd[:160]}")
    return found


def assert_none_left(workdir: Path, grace: float = 10.0) -> None:
    deadline = time.monotonic() + grace
    while (left := run_processes(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, "processes survived:\n" + "\n".join(left)


@pytest.fixture
def workdir(tmp_path):
    path = (tmp_path / "work").resolve()
    path.mkdir()
    yield path
    for line in run_processes(path):  # last resort, only ours
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_run_stops_everything_it_started(workdir):
    driver = DynamoDriver(DriverSettings(workdir=workdir, startup_timeout=300))
    try:
        driver.start()
        assert len(driver.workers()) == 2 and len(set(driver.workers())) == 2
        running = "\n".join(run_processes(workdir))
        assert running.count("dynamo.mocker") == 2 and "dynamo.frontend" in running and "sleep" in running, (
            f"the deployment and the namespace holder should be visible while they run:\n{running}")
        driver.reset()
    finally:
        driver.stop()
    assert_none_left(workdir)
    assert not list(workdir.glob("discovery-*")), "the discovery files this run wrote are removed"
    driver.stop()  # idempotent


def test_a_failed_start_leaves_nothing(workdir, monkeypatch):
    """The workers start, then the frontend dies on a bad flag: ServerStartError with the
    frontend's log, and no worker and no namespace left."""
    real = deploy.plan_deployment

    def broken(**kw):
        plan = real(**kw)
        plan.frontend.argv.append("--no-such-flag")
        return plan

    monkeypatch.setattr(deploy, "plan_deployment", broken)
    driver = DynamoDriver(DriverSettings(workdir=workdir, startup_timeout=300))
    with pytest.raises(ServerStartError, match="Dynamo frontend exited") as caught:
        driver.start()
    assert "no-such-flag" in str(caught.value)
    assert_none_left(workdir, grace=0)
    driver.stop()


INNER_TEST = textwrap.dedent('''
    import os, pathlib, time
    from pytest_rkv.drivers.base import DriverSettings
    from pytest_rkv.drivers.dynamo.driver import DynamoDriver

    def test_hold_a_deployment():
        workdir = pathlib.Path(os.environ["RKV_LIFECYCLE_WORKDIR"])
        driver = DynamoDriver(DriverSettings(workdir=workdir, startup_timeout=300))
        driver.start()  # deliberately no try/finally: the backstops must act
        (workdir / "READY").write_text("up")
        time.sleep(600)
''')


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill-9"])
def test_killing_pytest_leaves_nothing(workdir, how):
    test_file = workdir.parent / "inner_hold_test.py"
    test_file.write_text(INNER_TEST)
    env = {**os.environ, "RKV_LIFECYCLE_WORKDIR": str(workdir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    inner = subprocess.Popen([sys.executable, "-m", "pytest", str(test_file), "-q", "-s", "-p", "no:cacheprovider",
                              "-p", "no:rkv", "--rootdir", str(test_file.parent)],
                             cwd=test_file.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "READY").exists():
            assert inner.poll() is None, f"the inner run ended early:\n{inner.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "the deployment did not come up"
            time.sleep(0.5)
        assert run_processes(workdir)
        inner.send_signal(how)
        inner.wait(timeout=60)
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
    assert_none_left(workdir, grace=20)
