"""The one skip idiom for self-tests that need a real runtime (see the top-level conftest).

Availability is asked of the backend registry itself, so a test is skipped for exactly the
reason `pytest --rkv-backend=X` would refuse to run, and the message names what to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from pytest_rkv.drivers.registry import driver_class, load_class
from pytest_rkv.errors import BackendUnavailable

# backend id -> the marker its self-tests carry (several backends share a runtime)
MARKER = {"vllm": "vllm", "vllm+rkv": "vllm"}


def require_backend(*backends: str) -> list[pytest.MarkDecorator]:
    """Skip the calling module unless every backend can run here; else return its markers.

    Call it at module top, before importing anything that needs the runtime."""
    for backend in backends:
        try:
            driver_class(backend)
        except BackendUnavailable as exc:
            pytest.skip(str(exc), allow_module_level=True)
    markers = {MARKER.get(b, b.split("+")[0]) for b in backends}
    return [getattr(pytest.mark, name) for name in sorted(markers)] + [pytest.mark.slow]


def require_driver_modules(backend: str) -> None:
    """Skip the calling module unless the backend's driver imports here (its harness-side
    extra is installed); the runtime itself need not be. For unit tests of a driver's pure
    parts. Call it at module top, before importing the driver."""
    try:
        load_class(backend)
    except BackendUnavailable as exc:
        pytest.skip(str(exc), allow_module_level=True)


def certified_run(report: Path, backends: Iterable[str], *extra: str, timeout: float = 1800
                  ) -> subprocess.CompletedProcess:
    """One certified run of the released suite into `report`, started as a vendor would
    (its own process, so the run's servers, supervision and teardown are the real ones)."""
    from tests.conftest import SUITES

    return subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITES), "--rkv-certify", f"--rkv-backend={','.join(backends)}",
         "--rkv-report-dir", str(report), *extra, "-p", "no:cacheprovider", "-q"],
        capture_output=True, text=True, timeout=timeout,
    )


def processes_for(report: Path, *words: bytes) -> list[str]:
    """Live processes started for one run, as "pid command line": their environment names
    the run's report dir (every managed server inherits it), so servers of other sessions
    on the machine never count. With `words`, only command lines holding one of them."""
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if str(report).encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as c:
                cmd = c.read()
        except OSError:
            continue
        if not words or any(w in cmd for w in words):
            line = cmd.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{pid} {line[:160]}")
    return found
