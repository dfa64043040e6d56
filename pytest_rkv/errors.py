"""The suite's exceptions. Which class a failure raises decides its test outcome:

* `AssertionError` (and `ProtocolViolation`, a subclass): the backend broke the contract
  -> *failed*.
* `Unsupported`: the backend says, explicitly, it does not offer this -> *unsupported*
  (scope "feature") or *untestable* (scope "probe").
* `NotApplicable`: the obligation does not apply to this kind of backend.
* anything else, `HarnessError` included: the evidence is void -> *error* (unknown).
"""

from __future__ import annotations

from pytest_rkv.contract import UnsupportedScope


class RkvError(Exception):
    """Base of pytest-rkv's own errors."""


class HarnessError(RkvError):
    """The suite could not obtain evidence (not the backend's contract failure)."""


class ServerStartError(HarnessError):
    """A backend server did not become ready. Carries what was run and its log tail."""

    def __init__(self, message: str, *, argv: list[str] | None = None, log_tail: str = "") -> None:
        text = message
        if argv:
            text += "\n  command: " + " ".join(argv)
        if log_tail:
            text += "\n  server log (last lines):\n" + _indent(log_tail)
        super().__init__(text)
        self.log_tail = log_tail


class BackendCrashed(HarnessError):
    """The backend process died during the run; every later obligation is unknown."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        text = message + ("\n  server log (last lines):\n" + _indent(log_tail) if log_tail else "")
        super().__init__(text)
        self.log_tail = log_tail


class BackendUnavailable(RkvError):
    """The backend is registered, but its runtime (or a package it needs) is not installed.
    Selecting it is a usage error, raised before any test runs."""


class GeometryMismatch(HarnessError):
    """The backend's pool is not the one the probes are written for."""


class ProtocolViolation(AssertionError):
    """The backend answered outside RKV API v1 (malformed body, wrong status)."""


class NoAnswer(Exception):
    """The backend accepted a request but gave no answer within the bounded wait.

    Not a harness error: a runtime that queues the canonical probe's active request
    forever, instead of admitting or refusing it, breaks active refusal, and the test
    that waited records *failed* with this as its evidence. A backend that is down or
    unreachable is `BackendCrashed`/`HarnessError` instead (*unknown*)."""

    def __init__(self, waited_s: float, detail: str = "") -> None:
        text = f"no answer in {waited_s:g} s" + (f"; {detail}" if detail else "")
        super().__init__(text)
        self.waited_s = waited_s
        self.detail = detail


class Unsupported(Exception):
    """The backend declines: it does not offer the feature, or cannot be probed for it."""

    def __init__(self, reason: str, scope: UnsupportedScope = "feature") -> None:
        super().__init__(reason)
        self.reason = reason
        self.scope = scope


class NotApplicable(Exception):
    """The obligation does not apply to this backend (e.g. placement on one engine)."""


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())
