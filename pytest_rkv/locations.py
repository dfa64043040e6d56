"""Where the released suite and the lowering descriptors are, installed or in a checkout.

Both ship inside the distribution: the repository's `suites/` is the package
`pytest_rkv.suite` and its `backends/` is `pytest_rkv.descriptors` (mapped in
`pyproject.toml`), so a vendor who only installed the wheel runs the same files that a
checkout runs. A checkout used without installing it (source on `PYTHONPATH`) falls back to
the folders beside the package.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _package_dir(package: str, checkout_folder: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    folder = _CHECKOUT / checkout_folder
    if folder.is_dir():
        return folder
    raise FileNotFoundError(f"pytest-rkv is installed without its {package} package; reinstall pytest-rkv")


def suite_dir() -> Path:
    """The released suite's directory (the one `pytest --rkv-backend=X` collects)."""
    return _package_dir("pytest_rkv.suite", "suites")


def descriptors_dir() -> Path:
    """The released lowering descriptors, one folder per runtime."""
    return _package_dir("pytest_rkv.descriptors", "backends")
