"""Start a server process fully, or clean up fully.

* The server runs in its own session (process group), so stopping the group also stops
  whatever it spawned (vLLM's engine core, workers).
* It runs under `supervise.py`, which dies with pytest (PR_SET_PDEATHSIG) and then takes
  the whole group down, so even a SIGKILLed pytest leaves no server or helper behind.
* Every live `ManagedProcess` is tracked; `stop_all()` is the backstop the plugin calls at
  session end and at interpreter exit.
* A failed start stops the process before raising `ServerStartError` with the log tail.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pytest_rkv.errors import BackendCrashed, ServerStartError

_LIVE: set["ManagedProcess"] = set()
_LIVE_LOCK = threading.Lock()


SUPERVISOR = Path(__file__).with_name("supervise.py")


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    def __init__(
        self,
        argv: list[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        name: str = "server",
    ) -> None:
        self.argv, self.log_path, self.env, self.cwd, self.name = argv, log_path, env, cwd, name
        self.proc: subprocess.Popen | None = None

    # -- start -----------------------------------------------------------------------
    def start(self, ready: Callable[[], bool], timeout: float, poll: float = 0.25) -> None:
        """Launch and wait until `ready()` is true. On any failure, stop and raise."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # one log per start: no stale lines from earlier runs
        try:
            # Run by file path, so it works whether or not pytest_rkv is importable there.
            self.proc = subprocess.Popen(
                [sys.executable, str(SUPERVISOR), "--", *self.argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        finally:
            log.close()
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = time.monotonic() + timeout
        try:
            while True:
                code = self.proc.poll()
                if code is not None:
                    raise ServerStartError(
                        f"{self.name} exited with code {code} before it was ready",
                        argv=self.argv, log_tail=self.log_tail(),
                    )
                try:
                    if ready():
                        return
                except Exception:  # not listening yet
                    pass
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{self.name} was not ready after {timeout:.0f}s",
                        argv=self.argv, log_tail=self.log_tail(),
                    )
                time.sleep(poll)
        except BaseException:  # KeyboardInterrupt included: never leave it running
            self.stop()
            raise

    # -- state -----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BackendCrashed(
                f"{self.name} (pid {self.proc.pid}) exited with code {self.proc.returncode} during the run",
                log_tail=self.log_tail(),
            )

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)

    # -- stop ------------------------------------------------------------------------
    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the group, wait up to `grace`, then SIGKILL the group. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = proc.pid  # the leader is gone; its group may still have members
        _signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(pgid, timeout=5)
        with _LIVE_LOCK:
            _LIVE.discard(self)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def stop_all() -> None:
    """Backstop: stop every process this interpreter started and has not stopped."""
    with _LIVE_LOCK:
        live = list(_LIVE)
    for proc in live:
        proc.stop(grace=5.0)


atexit.register(stop_all)
