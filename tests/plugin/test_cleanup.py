"""Servers the suite starts never outlive it; `rkv-http` tests a server someone else runs."""

import os
import signal
import subprocess
import sys
import time

from pytest_rkv.drivers.process import ManagedProcess
from tests.conftest import SUITES, rkv_serve_pids


def test_ctrl_c_during_a_run_leaves_no_server(tmp_path):
    before = rkv_serve_pids()
    run = subprocess.Popen(
        [sys.executable, "-m", "pytest", str(SUITES), "--rkv-backend=reference-http",
         "--rkv-report-dir", str(tmp_path), "-p", "no:cacheprovider", "-q",
         "-k", "expired"],  # the one test that waits on a real clock: a window to interrupt
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    deadline = time.monotonic() + 30
    while not rkv_serve_pids() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    started = rkv_serve_pids() - before
    assert started, "the run never started its server"
    time.sleep(0.5)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=60)
    assert run.returncode == 2, output  # pytest's "interrupted"
    assert not started & rkv_serve_pids(), f"server(s) {started} survived Ctrl-C:\n{output}"


def test_rkv_http_against_a_running_server_is_native(run_suites, tmp_path):
    # RKV API v1.1: two tenants and an admin token, handed to the plugin as options
    tokens, admin = ("tenant-a-token-1", "tenant-b-token-2"), "admin-token-3456"
    env = {**os.environ, "RKV_TOKENS": f"{tokens[0]}=a,{tokens[1]}=b", "RKV_ADMIN_TOKEN": admin}
    server = ManagedProcess([sys.executable, "-m", "pytest_rkv.cli", "serve", "--port", "0"],
                            log_path=tmp_path / "serve.log", name="rkv serve", env=env)
    url = []

    def ready() -> bool:
        for line in server.log_tail(5).splitlines():
            if "listening on" in line:
                url.append(line.split("listening on ")[1].split()[0])
                return True
        return False

    server.start(ready, timeout=30)
    try:
        run = run_suites("--rkv-backend=rkv-http", f"--rkv-url={url[0]}",
                         f"--rkv-tenant-tokens={','.join(tokens)}", f"--rkv-admin-token={admin}")
        row = run.row("rkv-http")
        assert row["label"] == "native conformance", row["reason"]
        assert row["runtime"] == "pytest-rkv-reference"
    finally:
        server.stop()
    assert server.proc.pid not in rkv_serve_pids()
