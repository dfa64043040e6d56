"""Backend names -> driver classes, as dotted strings imported only when selected, so a
run that never names vLLM never imports it."""

from __future__ import annotations

import importlib

from pytest_rkv.drivers.base import Driver

BACKENDS: dict[str, str] = {
    "reference": "pytest_rkv.drivers.reference:ReferenceDriver",
    "reference-http": "pytest_rkv.drivers.http:ReferenceHttpDriver",
    "rkv-http": "pytest_rkv.drivers.http:RkvHttpDriver",
    "vllm": "pytest_rkv.drivers.vllm.driver:VllmDriver",
    "vllm+rkv": "pytest_rkv.drivers.vllm_rkv:VllmRkvDriver",
}


class UnknownBackend(ValueError):
    pass


def driver_class(name: str) -> type[Driver]:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise UnknownBackend(
            f"unknown backend {name!r}; available: {', '.join(BACKENDS)}"
        ) from None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
