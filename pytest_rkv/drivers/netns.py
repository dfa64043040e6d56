"""A loopback-only network namespace for runtimes that bind every interface.

Why: Dynamo's ZMQ event plane, the mocker's KV event publishers and vLLM's `tcp://*`
publisher bind 0.0.0.0 and have no host option. Inside a namespace whose only interface
is `lo`, nothing they open is reachable from beyond this machine's own test process.

How:

* A *holder* process (`unshare -n --fork sh -c 'ip link set lo up; ...; exec sleep'`)
  creates the namespace and keeps it alive. It is a `ManagedProcess`, so it runs under
  `supervise.py` and dies with pytest like every server.
* Every runtime process starts as `nsenter --net=/proc/<holder>/ns/net -- <argv>`
  (`wrap`); nsenter execs, so the supervised pid is the runtime itself.
* The test process reaches those loopback ports from one dedicated thread that joined
  the namespace with setns(2) (`call`). A namespace is per thread, and threads (and
  the I/O threads of a ZMQ context) inherit it from the thread that creates them, so
  HTTP clients and KV event subscribers are built inside `call` too.

Needs root (or CAP_SYS_ADMIN), `unshare`, `nsenter` and `ip`: `unavailable()` says
what is missing, so tests can skip and drivers can fail with one clear line.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.errors import HarnessError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
TOOLS = ("unshare", "nsenter", "ip")
MARKER_ENV = "RKV_NETNS_WORKDIR"  # in the holder's environment, so tests can find it
HOLDER_SECONDS = 7 * 24 * 3600  # the holder outlives any run; ManagedProcess stops it


def unavailable() -> str | None:
    """Why a loopback namespace cannot be made here, or None if it can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)} (util-linux, iproute2)"
    if os.geteuid() != 0:
        return "creating a network namespace needs root (CI runs as root)"
    return None


class LoopbackNamespace:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.holder: ManagedProcess | None = None
        self.pid: int | None = None
        self._thread: ThreadPoolExecutor | None = None

    # -- life cycle ------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        why = unavailable()
        if why:
            raise HarnessError(f"cannot isolate the deployment in a loopback-only network namespace: {why}")
        pid_file = self.workdir / "netns-holder.pid"
        pid_file.unlink(missing_ok=True)
        script = f"ip link set lo up && echo $$ > {pid_file} && exec sleep {HOLDER_SECONDS}"
        self.holder = ManagedProcess(["unshare", "-n", "--fork", "sh", "-c", script],
                                     log_path=self.workdir / "netns-holder.log", name="netns holder",
                                     env={**os.environ, MARKER_ENV: str(self.workdir)})

        def ready() -> bool:
            return pid_file.exists() and pid_file.read_text().strip().isdigit()

        self.holder.start(ready, timeout=timeout, poll=0.05)
        self.pid = int(pid_file.read_text())
        pid_file.unlink(missing_ok=True)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rkv-netns",
                                          initializer=_join, initargs=(self.path,))
        self.call(_loopback_only)  # fails here, not in a test, if the join did not work

    def stop(self) -> None:
        """Idempotent. Stop the runtimes first: the namespace dies with its last process."""
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.shutdown(wait=True)
        if self.holder is not None:
            self.holder.stop(grace=2.0)
        self.pid = None

    # -- use -------------------------------------------------------------------------
    @property
    def path(self) -> str:
        if self.pid is None:
            raise HarnessError("the network namespace was used before start() succeeded")
        return f"/proc/{self.pid}/ns/net"

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run `fn` on the thread that lives in the namespace and return its result."""
        if self._thread is None:
            raise HarnessError("the network namespace was used before start() succeeded")
        return self._thread.submit(fn, *args, **kwargs).result()

    def check_alive(self) -> None:
        if self.holder is not None:
            self.holder.check_alive()


def _join(path: str) -> None:
    """setns(2) for this thread only (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def _loopback_only() -> None:
    # The thread's own view of the network (/sys/class/net shows the mount's namespace).
    with open(f"/proc/self/task/{threading.get_native_id()}/net/dev") as f:
        interfaces = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    if interfaces != ["lo"]:
        raise HarnessError(f"the namespace thread sees interfaces {interfaces}, not only lo")
