"""Transcripts of Driver calls: a recording proxy, the value codec, and the replay driver.

`Recorder(driver, test)` stands in for a driver during one test: every public method call
(the test's, its fixtures' and the plugin's trace capture) goes to the real driver and is
noted as an `evidence.Call` (method, bound arguments, the answer or the exception). It is
generic: a method a driver adds later is recorded the same way, as long as its arguments
and results are pydantic models, `Reply`, enums, plain JSON values, or exceptions.

`ReplayDriver` serves a bundle's transcript back, test by test, for `rkv verify`: a call
that is not the next recorded one, or has other arguments, is a `ReplayDivergence` (an
error outcome, so the replayed row disagrees and the bundle is refused). It is a verifier's
tool: the plugin refuses to certify it, and it never reaches a runtime.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import importlib
import inspect
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pytest_rkv.certify import redact
from pytest_rkv.drivers.base import Driver, DriverSettings, Reply
from pytest_rkv.errors import HarnessError
from pytest_rkv.evidence import TRANSCRIPT, Call, EvidenceError, Raised, read_row, read_transcript, test_key

# Driver members that are not calls into the runtime: the session's own lifecycle.
NOT_RECORDED = frozenset({"start", "stop", "log_tail", "describe"})
_TRUSTED_MODULES = ("pytest_rkv.",)  # replay imports model and error classes only from here


class ReplayDivergence(HarnessError):
    """The replayed test made a call its transcript does not have next."""


# -- values <-> transcript JSON -------------------------------------------------------------


def _qualname(obj: type) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, enum.Enum):
        return {"$enum": _qualname(type(value)), "value": value.value}
    if isinstance(value, BaseModel):
        return {"$model": _qualname(type(value)), "data": value.model_dump(mode="json", by_alias=True)}
    if isinstance(value, Reply):
        return {"$reply": {"status": value.status, "value": encode(value.value), "error": encode(value.error)}}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"$dataclass": _qualname(type(value)),
                "data": {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((encode(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {"$dict": {str(k): encode(v) for k, v in value.items()}}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot record a {type(value).__name__} in a transcript")


def _trusted_class(name: Any, base: type) -> type:
    if not isinstance(name, str) or ":" not in name:
        raise EvidenceError(f"{TRANSCRIPT}: {str(name)[:60]!r} is not a class name")
    module, _, qual = name.partition(":")
    if not module.startswith(_TRUSTED_MODULES):
        raise EvidenceError(f"{TRANSCRIPT}: {name[:60]} is outside pytest_rkv; refused")
    try:
        obj: Any = importlib.import_module(module)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise EvidenceError(f"{TRANSCRIPT}: no class {name[:60]}") from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise EvidenceError(f"{TRANSCRIPT}: {name[:60]} is not a {base.__name__}")
    return obj


def decode(value: Any) -> Any:
    if isinstance(value, list):
        return [decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$dict" in value:
        return {k: decode(v) for k, v in value["$dict"].items()}
    if "$reply" in value:
        r = value["$reply"]
        return Reply(status=r["status"], value=decode(r.get("value")), error=decode(r.get("error")))
    if "$model" in value:
        cls = _trusted_class(value["$model"], BaseModel)
        try:
            return cls.model_validate(value["data"])
        except Exception as exc:
            raise EvidenceError(f"{TRANSCRIPT}: a {cls.__name__} does not validate ({str(exc).splitlines()[0]})") from None
    if "$dataclass" in value:
        cls = _trusted_class(value["$dataclass"], object)
        if not dataclasses.is_dataclass(cls) or not isinstance(value.get("data"), dict):
            raise EvidenceError(f"{TRANSCRIPT}: {str(value['$dataclass'])[:60]} is not a dataclass record")
        try:
            return cls(**{k: decode(v) for k, v in value["data"].items()})
        except TypeError as exc:
            raise EvidenceError(f"{TRANSCRIPT}: a {cls.__name__} does not build ({exc})") from None
    if "$enum" in value:
        return _trusted_class(value["$enum"], enum.Enum)(value["value"])
    raise EvidenceError(f"{TRANSCRIPT}: untagged object {sorted(value)[:3]}")


def encode_exception(exc: BaseException) -> Raised:
    attrs = {k: encode(v) for k, v in vars(exc).items() if not k.startswith("_")}
    try:
        args = [encode(a) for a in exc.args]
    except TypeError:
        args = [str(exc)]
    return Raised(type=_qualname(type(exc)), args=args, attrs=attrs, text=redact(str(exc))[:4000])


def decode_exception(raised: Raised) -> BaseException:
    """The recorded exception, rebuilt: a pytest_rkv error or a builtin keeps its class (so
    the replayed test classifies it as the live one did); any other becomes a HarnessError."""
    module, _, qual = raised.type.partition(":")
    cls: Any = None
    if module == "builtins" and isinstance(getattr(builtins, qual, None), type):
        cls = getattr(builtins, qual)
    elif module.startswith(_TRUSTED_MODULES):
        try:
            cls = _trusted_class(raised.type, BaseException)
        except EvidenceError:
            cls = None
    if cls is None or not issubclass(cls, Exception):
        return HarnessError(f"{raised.type}: {raised.text}")
    exc = cls.__new__(cls)
    exc.args = tuple(decode(a) for a in raised.args)
    for key, value in raised.attrs.items():
        setattr(exc, key, decode(value))
    return exc


# -- recording -------------------------------------------------------------------------------


def _public_method(driver: Driver, name: str) -> bool:
    return not name.startswith("_") and name not in NOT_RECORDED and callable(getattr(type(driver), name, None))


class Recorder:
    """A driver as one test sees it: calls pass through and are noted in order.

    A method that answers with another driver (a view of the same runtime, such as
    `other_tenant()`) is recorded as `{"$driver": <method>}`, and the view's own calls go
    to the same transcript, named `<method>.<call>`."""

    def __init__(self, driver: Driver, test: str, calls: list[dict] | None = None, prefix: str = "") -> None:
        self._driver = driver
        self._test = test
        self._prefix = prefix
        self.calls: list[dict] = [] if calls is None else calls

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._driver, name)
        if not _public_method(self._driver, name):
            return attr
        signature = inspect.signature(attr)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            entry: dict[str, Any] = {"test": self._test, "i": len(self.calls), "method": self._prefix + name,
                                     "args": {k: encode(v) for k, v in bound.arguments.items()}}
            self.calls.append(entry)
            try:
                result = attr(*args, **kwargs)
            except Exception as exc:
                entry["raised"] = encode_exception(exc).model_dump(mode="json")
                raise
            if isinstance(result, (Driver, _ReplayView)):  # a view of the runtime, not a value
                entry["returned"] = {"$driver": self._prefix + name}
                return Recorder(result, self._test, self.calls, prefix=f"{self._prefix}{name}.")
            entry["returned"] = encode(result)
            return result

        call.__name__ = name
        return call


# -- replay ----------------------------------------------------------------------------------


class ReplayDriver(Driver):
    """Serves a bundle's transcript; see the module docstring. `settings.replay` is the bundle."""

    name = "replay"

    def __init__(self, settings: DriverSettings) -> None:
        super().__init__(settings)
        bundle = getattr(settings, "replay", None)
        if bundle is None:
            raise HarnessError("the replay backend needs --rkv-replay BUNDLE (it is rkv verify's tool)")
        self.bundle = Path(bundle)
        self.row = read_row(self.bundle)
        self.transcripts = {test_key(n): calls for n, calls in read_transcript(self.bundle / TRANSCRIPT).items()}
        self.recorded_backend = self.row.backend
        # Label as the recorded backend was labelled: its registered depth, not a field a
        # forger could edit (an unregistered backend keeps what the row says).
        cls = recorded_class(self.row.backend)
        self.depth = cls.depth if cls else self.row.depth
        self.routed = cls.routed if cls else self.row.routed
        self._calls: list[Call] = []
        self._test = ""

    def begin_test(self, nodeid: str) -> None:
        """Serve `nodeid`'s calls next (the recorded test of the same name)."""
        self._test = nodeid
        self._calls = list(self.transcripts.get(test_key(nodeid), []))

    def describe(self) -> dict:
        return dict(self.row.runtime_details)

    def serve(self, method: str, args: dict[str, Any]) -> Any:
        if not self._calls:
            raise ReplayDivergence(f"replay of {self._test}: the test called {method}() "
                                   "but its transcript has no further call")
        recorded = self._calls.pop(0)
        if recorded.method != method or recorded.args != args:
            raise ReplayDivergence(
                f"replay of {self._test}: call {recorded.i} is {method}({_brief(args)}) but the transcript "
                f"has {recorded.method}({_brief(recorded.args)})")
        if recorded.raised is not None:
            raise decode_exception(recorded.raised)
        if isinstance(recorded.returned, dict) and set(recorded.returned) == {"$driver"}:
            return _ReplayView(self, f"{recorded.returned['$driver']}.")
        return decode(recorded.returned)

    def __getattribute__(self, name: str) -> Any:
        # Every Driver call is served from the transcript, including methods a driver
        # subclass adds (looked up on the recorded backend's class).
        if name.startswith("_") or name in NOT_RECORDED or name in _OWN:
            return object.__getattribute__(self, name)
        target = _method_of(object.__getattribute__(self, "recorded_backend"), name)
        if target is None:
            return object.__getattribute__(self, name)
        signature = inspect.signature(target)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(None, *args, **kwargs)
            bound.apply_defaults()
            arguments = {k: encode(v) for k, v in list(bound.arguments.items())[1:]}
            return self.serve(name, arguments)

        return call

    def info(self):  # pragma: no cover - served by __getattribute__
        raise AssertionError

    def reset(self) -> None:  # pragma: no cover - served by __getattribute__
        raise AssertionError

    def complete(self, req):  # pragma: no cover - served by __getattribute__
        raise AssertionError


class _ReplayView:
    """A driver view the recorded test got from a driver method (e.g. `other_tenant()`):
    its calls are served from the same transcript under the view's prefix."""

    def __init__(self, replay: ReplayDriver, prefix: str) -> None:
        self._replay, self._prefix = replay, prefix

    def __getattr__(self, name: str) -> Any:
        target = _method_of(self._replay.recorded_backend, name)
        if target is None or name.startswith("_"):
            raise AttributeError(name)
        signature = inspect.signature(target)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(None, *args, **kwargs)
            bound.apply_defaults()
            arguments = {k: encode(v) for k, v in list(bound.arguments.items())[1:]}
            return self._replay.serve(self._prefix + name, arguments)

        return call


_OWN = frozenset({"bundle", "row", "transcripts", "recorded_backend", "depth", "routed", "settings",
                  "begin_test", "serve", "name", "describe"})


def recorded_class(backend: str) -> type[Driver] | None:
    """The registered driver class of `backend`, imported without asking for its runtime
    (a verifier needs the class's depth and method signatures, never the runtime itself)."""
    from pytest_rkv.drivers.registry import UnknownBackend, lookup

    try:
        module, _, attr = lookup(backend).target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
    except (UnknownBackend, ImportError, AttributeError):
        return None
    return cls if isinstance(cls, type) and issubclass(cls, Driver) else None


def _method_of(backend: str, name: str) -> Any:
    """The recorded backend's method `name` (its signature binds the replayed arguments)."""
    cls = recorded_class(backend) or Driver
    attr = getattr(cls, name, None)
    return attr if callable(attr) and not isinstance(attr, type) else None


def _brief(args: dict[str, Any]) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return text if len(text) <= 160 else text[:157] + "..."
