"""Backend ids -> driver classes, through the `pytest_rkv.backends` entry-point group.

Every backend, built-in or a vendor's, is registered the same way, in its distribution's
metadata:

    [project.entry-points."pytest_rkv.backends"]
    my-runtime = "my_package.driver:MyDriver [my-extra]"

The entry point is loaded only when its backend is selected, so a run that never names vLLM
never imports it. The optional `[extra]` names what to install for the runtime; it is only
used to say so when the runtime is missing.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from importlib import metadata

from pytest_rkv.drivers.base import Driver
from pytest_rkv.errors import BackendUnavailable

GROUP = "pytest_rkv.backends"


class UnknownBackend(ValueError):
    """No installed distribution registers this backend id."""


@dataclass(frozen=True)
class Backend:
    """One registered backend, as its distribution's metadata declares it."""

    id: str
    target: str  # "module:Class"
    distribution: str  # the distribution that registers it ("pytest-rkv" for the built-ins)
    version: str
    extras: tuple[str, ...]

    @property
    def install_hint(self) -> str:
        """What to install for the runtime, when the entry point names extras."""
        if not self.extras:
            return ""
        return "; install its runtime: " + " or ".join(f"pip install '{self.distribution}[{e}]'" for e in self.extras)


@functools.cache
def installed() -> dict[str, Backend]:
    """Every registered backend, by id (the first distribution on the path wins a clash).
    Read once per process: installing a distribution mid-run is not supported."""
    found: dict[str, Backend] = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == GROUP and ep.name not in found:
                module, _, attr = ep.value.partition(":")
                attr, _, extras = attr.partition("[")
                found[ep.name] = Backend(
                    id=ep.name,
                    target=f"{module.strip()}:{attr.strip()}",
                    distribution=dist.metadata["Name"],
                    version=dist.version,
                    extras=tuple(e.strip() for e in extras.rstrip("]").split(",") if e.strip()),
                )
    return dict(sorted(found.items()))


# `rkv verify`'s own backend: it serves a bundle's transcript, it is not a runtime, so it is
# not registered in the group (never listed by `rkv backends`; --rkv-certify refuses it).
VERIFIER_BACKENDS = {"replay": "pytest_rkv.drivers.recording:ReplayDriver"}


def lookup(name: str) -> Backend:
    if name in VERIFIER_BACKENDS:
        return Backend(name, VERIFIER_BACKENDS[name], "pytest-rkv", metadata.version("pytest-rkv"), ())
    backends = installed()
    if name not in backends:
        raise UnknownBackend(
            f"unknown backend {name!r}; installed: {', '.join(backends) or 'none'} "
            "(`rkv backends` lists them; a vendor's backend is a distribution that registers "
            f"an entry point in the {GROUP!r} group)"
        )
    return backends[name]


def driver_class(name: str) -> type[Driver]:
    """The driver class of backend `name`, checked to be installed and usable."""
    cls = load_class(name)
    try:
        cls.check_available()
    except BackendUnavailable as exc:
        raise BackendUnavailable(f"backend {name!r} {exc}{lookup(name).install_hint}") from None
    return cls


def load_class(name: str) -> type[Driver]:
    """The driver class of backend `name`, imported but not asked whether its runtime is
    here (the driver's own modules and the harness-side extras are)."""
    backend = lookup(name)
    module, _, attr = backend.target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(
            f"backend {name!r} cannot load: {exc}{backend.install_hint}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Driver)):
        raise UnknownBackend(f"backend {name!r} ({backend.target}, from {backend.distribution}) is not a Driver class")
    return cls
