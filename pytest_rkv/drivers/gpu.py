"""GPU memory hygiene between servers.

A vLLM server that has stopped may hold GPU memory for a few seconds more (its workers
exit after the API server); a leaked one holds it for good, and the next server then gets a
smaller pool than it asked for, or fails. Backends with one server per row therefore wait,
after stopping, until the GPUs' used memory is back near what it was before the start.
Without nvidia-smi (CPU machines) there is nothing to check.
"""

from __future__ import annotations

import shutil
import subprocess
import time

SLACK_MIB = 512  # drivers, other tenants and allocator noise


def used_mib() -> int | None:
    """Total memory used on all GPUs, from nvidia-smi; None when there are none."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return sum(int(v) for v in out.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def wait_for_release(baseline: int | None, timeout: float = 60.0) -> str | None:
    """Wait until used memory is within SLACK_MIB of `baseline`. Returns None when it is
    (or when there is no GPU), else a sentence saying what is still held."""
    if baseline is None:
        return None
    deadline = time.monotonic() + timeout
    while True:
        now = used_mib()
        if now is None or now <= baseline + SLACK_MIB:
            return None
        if time.monotonic() > deadline:
            return (f"GPU memory still {now} MiB used {timeout:.0f}s after the server stopped "
                    f"(baseline {baseline} MiB): a server process may have leaked")
        time.sleep(1.0)
