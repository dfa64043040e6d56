"""The one skip idiom for self-tests that need a real runtime (see the top-level conftest).

Availability is asked of the backend registry itself, so a test is skipped for exactly the
reason `pytest --rkv-backend=X` would refuse to run, and the message names what to install.
"""

from __future__ import annotations

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
