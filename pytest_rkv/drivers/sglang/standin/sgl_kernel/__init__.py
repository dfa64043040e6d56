"""pytest-rkv's import-only stand-in for SGLang's `sgl_kernel` package (CPU runs only).

Why it exists: with `SGLANG_USE_CPU_ENGINE=1`, SGLang 0.5.23 imports the names of its CPU
kernels from `sgl_kernel` when its modules load, but it calls them only on a CPU with AMX
(every call site is gated on `cpu_has_amx_support()`); elsewhere it takes its
`torch_native` / `forward_native` paths. No CPU build of sgl-kernel exists on PyPI.

What it does: `import sgl_kernel` and `import sgl_kernel.<anything>` succeed, and every
attribute is a stand-in callable that RAISES `SglKernelStandInCalled` naming the kernel
(and appends the name to `$RKV_SGL_KERNEL_CALL_LOG`, if set), so a kernel that is really
needed fails the run loudly instead of computing nothing. `sgl_kernel.scalar_type` raises
ImportError, because SGLang has its own fallback for exactly that module.

The pytest-rkv `sglang` driver puts this directory on the server's PYTHONPATH and
declares the stand-in in the row (`describe()["stand_ins"]`). It is never used on GPU
runners, where the real sgl-kernel is installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types

STAND_IN = True  # lets the driver (and anyone) tell this package from the real one
__version__ = "0.0.0+rkv-stand-in"

_NO_FALLBACK_NEEDED = {"sgl_kernel.scalar_type"}  # SGLang falls back when these fail to import


class SglKernelStandInCalled(RuntimeError):
    """SGLang called a kernel that the import-only stand-in cannot provide."""


def _log_call(name: str) -> None:
    path = os.environ.get("RKV_SGL_KERNEL_CALL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(name + "\n")


class _Kernel:
    """A name SGLang imported; calling it is the error the stand-in exists to make loud."""

    def __init__(self, name: str) -> None:
        self.__name__ = self.__qualname__ = name.rsplit(".", 1)[-1]
        self._name = name

    def __call__(self, *args, **kwargs):
        _log_call(self._name)
        raise SglKernelStandInCalled(
            f"SGLang called the sgl_kernel kernel {self._name!r}, but pytest-rkv runs SGLang "
            "on CPU with an import-only stand-in for sgl_kernel (no CPU build exists on PyPI). "
            "This path needs the real kernel: run on a GPU runner with upstream SGLang."
        )

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Kernel(f"{self._name}.{attr}")

    def __repr__(self) -> str:
        return f"<sgl_kernel stand-in {self._name}>"


def _module_getattr(module_name: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Kernel(f"{module_name}.{attr}")

    return __getattr__


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `sgl_kernel.<sub>` importable, each submodule as empty as the package."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("sgl_kernel."):
            return None
        if fullname in _NO_FALLBACK_NEEDED:
            raise ImportError(f"{fullname} is not provided by pytest-rkv's sgl_kernel stand-in")
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr(spec.name)
        return module

    def exec_module(self, module):
        pass


__getattr__ = _module_getattr("sgl_kernel")
sys.meta_path.insert(0, _SubmoduleFinder())
