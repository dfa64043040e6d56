"""No LMCache or vLLM process outlives a failed start or a Ctrl-C of `vllm+lmcache` or of
`vllm+rkv+lmcache` (the claims adapter with the same tier, started by the same mixin).

Uses the REAL servers: LMCache's MP cache server and vLLM with its connector. The
processes of a run are found as in test_vllm_lifecycle.py (the `RKV_VLLM_WORKDIR` marker
both servers inherit, their sessions, the pids vLLM logs), so another helper's servers on
the same machine never count.
"""

from __future__ import annotations

import signal
import textwrap

import pytest

from tests.runtimes import require_backend

pytestmark = require_backend("vllm+lmcache")
psutil = pytest.importorskip("psutil")  # comes with vLLM

from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.vllm import lmcache as tier_mod  # noqa: E402
from pytest_rkv.drivers.vllm_lmcache import VllmLmcacheDriver  # noqa: E402
from pytest_rkv.drivers.vllm_rkv_lmcache import VllmRkvLmcacheDriver  # noqa: E402
from pytest_rkv.errors import ServerStartError  # noqa: E402
from tests.vllm.test_vllm_lifecycle import (  # noqa: E402
    RunProcesses,
    describe,
    signal_and_wait,
    start_inner_pytest,
    wait_for,
)


@pytest.fixture
def run(tmp_path):
    workdir = (tmp_path / "work").resolve()
    workdir.mkdir()
    processes = RunProcesses(workdir)
    yield processes
    processes.kill_all()


def _tier_processes(run: RunProcesses) -> list:
    return [p for p in run.live() if any(tier_mod.SERVER_MODULE in a for a in (p.cmdline() or []))]


def test_tier_that_cannot_start_raises_and_leaves_nothing(run, monkeypatch):
    """LMCache exits at once (an invalid eviction policy): a clear error, no vLLM started."""
    real_plan = tier_mod.plan_tier

    def broken_plan(**kw):
        plan = real_plan(**kw)
        argv = [*plan.argv]
        argv[argv.index("LRU")] = "no-such-policy"
        return tier_mod.TierPlan(argv=argv, env=plan.env, zmq_port=plan.zmq_port,
                                 http_port=plan.http_port, log_path=plan.log_path)

    monkeypatch.setattr(tier_mod, "plan_tier", broken_plan)
    driver = VllmLmcacheDriver(DriverSettings(workdir=run.workdir, startup_timeout=120))
    with pytest.raises(ServerStartError, match="LMCache server exited with code") as caught:
        driver.start()
    assert "no-such-policy" in caught.value.log_tail
    assert not (run.workdir / "vllm-server.log").exists(), "vLLM must not start without its tier"
    run.assert_none_left(grace=0)
    driver.stop()
    driver.stop()


BOTH = pytest.mark.parametrize("driver_cls", [VllmLmcacheDriver, VllmRkvLmcacheDriver], ids=lambda c: c.name)


@BOTH
def test_vllm_that_fails_after_the_tier_started_leaves_neither(run, driver_cls):
    """The tier is up, then vLLM dies on an impossible block size: both are gone."""
    driver = driver_cls(DriverSettings(workdir=run.workdir, block_size=16, startup_timeout=300))
    with pytest.raises(ServerStartError, match="vLLM server exited with code"):
        driver.start()
    assert "Application startup complete" in (run.workdir / tier_mod.LOG_NAME).read_text(errors="replace")
    run.assert_none_left(grace=5)
    driver.stop()


INNER_TEST = textwrap.dedent('''
    import os, pathlib, time
    from pytest_rkv.drivers.base import DriverSettings
    from {module} import {cls}

    def test_hold_a_server():
        workdir = pathlib.Path(os.environ["RKV_LIFECYCLE_WORKDIR"])
        driver = {cls}(DriverSettings(workdir=workdir, startup_timeout=900))
        driver.start()  # deliberately no try/finally: the driver's own backstops must act
        (workdir / "READY").write_text(str(driver.server.pid))
        time.sleep(600)
''')


@BOTH
def test_ctrl_c_while_both_servers_run_leaves_nothing(run, monkeypatch, driver_cls):
    monkeypatch.setattr("tests.vllm.test_vllm_lifecycle.INNER_TEST",
                        INNER_TEST.format(module=driver_cls.__module__, cls=driver_cls.__name__))
    inner = start_inner_pytest(run)
    try:
        wait_for(lambda: (run.workdir / "READY").exists(), 900, "vLLM + LMCache to be ready", inner)
        assert _tier_processes(run), f"expected the LMCache server:\n{describe(run.live())}"
        assert len(run.live()) >= 4, f"expected LMCache, vLLM server, engine, worker:\n{describe(run.live())}"
        out = signal_and_wait(inner, signal.SIGINT)
    finally:
        if inner.poll() is None:
            inner.kill()
    assert "KeyboardInterrupt" in out, out
    run.assert_none_left(grace=15)
