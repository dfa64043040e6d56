"""Which Python runs SGLang, and what in that environment is not SGLang's own.

SGLang and vLLM pin different versions of the same dependencies, so SGLang lives in a
venv of its own (made by `scripts/setup_sglang.sh`) and the driver starts its server with
that venv's interpreter. It is found, in order, at:

1. `$RKV_SGLANG_PYTHON` (e.g. a GPU runner's environment with upstream SGLang);
2. `<repository>/.venvs/sglang/bin/python` (where the set-up script puts it).

On CPU two pieces of that venv are not upstream's, and the row says so (`stand_ins`):

* `sgl_kernel`: pytest-rkv's import-only stand-in (`standin/sgl_kernel`), put on the
  server's PYTHONPATH by the driver when the venv has no real sgl-kernel. Every kernel
  call raises; SGLang's CPU engine makes none on a CPU without AMX.
* torchvision's fake-op registrations, guarded by the set-up script (PyPI's torchvision
  cannot load its C ops beside the CPU torch; SGLang imports it, text models never use it).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pytest_rkv.errors import HarnessError

PYTHON_ENV = "RKV_SGLANG_PYTHON"
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VENV = REPO_ROOT / ".venvs" / "sglang"
STAND_IN_DIR = Path(__file__).resolve().with_name("standin")
# The line scripts/setup_sglang.sh adds to torchvision/_meta_registrations.py.
TORCHVISION_GUARD_MARK = "# pytest-rkv guard"

_PROBE = r"""
import importlib.metadata as md, importlib.util as u, json, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
tv = u.find_spec("torchvision")
meta = None
if tv is not None and tv.submodule_search_locations:
    import os
    path = os.path.join(list(tv.submodule_search_locations)[0], "_meta_registrations.py")
    meta = open(path).read() if os.path.exists(path) else None
print(json.dumps({
    "python": sys.version.split()[0],
    "sglang": version("sglang"),
    "torch": version("torch"),
    "torchvision": version("torchvision"),
    "sgl_kernel_dist": version("sgl-kernel"),
    "torchvision_guarded": meta is not None and %r in meta,
}))
""" % TORCHVISION_GUARD_MARK


class SglangMissing(HarnessError):
    """No interpreter with SGLang installed was found."""


@dataclass(frozen=True)
class SglangEnvironment:
    python: str
    sglang_version: str
    torch_version: str | None
    torchvision_version: str | None
    real_sgl_kernel: str | None  # the sgl-kernel distribution's version, if installed
    torchvision_guarded: bool

    @property
    def needs_kernel_stand_in(self) -> bool:
        return self.real_sgl_kernel is None

    def stand_ins(self) -> list[str]:
        """What the row must declare (provenance `stand_ins`): pieces of the server's
        environment that are not upstream's, one line each."""
        out = []
        if self.needs_kernel_stand_in:
            out.append("sgl_kernel: pytest-rkv's import-only stand-in (pytest_rkv/drivers/sglang/standin; "
                       "every kernel call raises; no CPU build of sgl-kernel on PyPI)")
        if self.torchvision_guarded:
            out.append(f"torchvision {self.torchvision_version}: fake-op registrations guarded by "
                       "scripts/sglang_torchvision_guard.py (its C ops do not load beside the CPU torch)")
        return out


def default_python() -> Path:
    return DEFAULT_VENV / "bin" / "python"


def find_python(env: dict[str, str] | None = None) -> str:
    """The interpreter to run SGLang with; SglangMissing says how to get one."""
    env = os.environ if env is None else env
    chosen = env.get(PYTHON_ENV) or str(default_python())
    if not Path(chosen).exists():
        raise SglangMissing(
            f"no SGLang interpreter at {chosen}; run `bash scripts/setup_sglang.sh` (CPU) or "
            f"point ${PYTHON_ENV} at the python of an environment with SGLang installed"
        )
    return chosen


def inspect(python: str) -> SglangEnvironment:
    """Ask the interpreter what it has (versions, stand-ins), without importing SGLang."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SglangMissing(f"cannot run {python}: {exc}") from None
    if out.returncode != 0:
        raise SglangMissing(f"{python} failed to describe itself: {out.stderr.strip()[-500:]}")
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    if not facts["sglang"]:
        raise SglangMissing(f"{python} has no sglang installed; run `bash scripts/setup_sglang.sh` "
                            f"or set ${PYTHON_ENV}")
    return SglangEnvironment(
        python=python, sglang_version=facts["sglang"], torch_version=facts["torch"],
        torchvision_version=facts["torchvision"], real_sgl_kernel=facts["sgl_kernel_dist"],
        torchvision_guarded=facts["torchvision_guarded"],
    )
