"""The one interface the suites talk to. Every backend is a `Driver`.

A driver answers in RKV API v1 terms (the models in `pytest_rkv.contract`) whatever the
runtime behind it speaks. A call the runtime does not offer raises `Unsupported`, never
returns a made-up answer: the suite then records *unsupported*, not *pass*.

Non-2xx answers of the runtime are not exceptions: they come back as a `Reply` whose
`error` is set, because a refusal is often exactly the evidence a test wants.
"""

from __future__ import annotations

import importlib.util
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from pytest_rkv.contract import (
    Claim,
    ClaimRequest,
    Completion,
    CompletionRequest,
    Depth,
    ErrorBody,
    Event,
    EventPage,
    FaultRequest,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.errors import BackendUnavailable, Unsupported

T = TypeVar("T")


@dataclass(frozen=True)
class Reply(Generic[T]):
    """A runtime's answer: `value` on 2xx, `error` (with `status`) otherwise."""

    status: int
    value: T | None = None
    error: ErrorBody | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> T:
        """The value, or an AssertionError that shows the runtime's error body."""
        if self.error is not None or self.value is None:
            raise AssertionError(f"expected success, runtime answered {self.status}: {self.error}")
        return self.value


@dataclass(frozen=True)
class DriverSettings:
    """What a driver may need from the run's configuration."""

    workdir: Path  # where to put logs, sockets, generated model configs
    url: str | None = None
    block_size: int | None = None
    model: str | None = None
    startup_timeout: float = 240.0
    # How long a completion may stay unanswered before the driver raises `NoAnswer`
    # (a runtime that queues a request it can neither admit nor refuse).
    refusal_timeout: float = 30.0
    reference_faults: frozenset[str] = frozenset()
    replay: Path | None = None  # the bundle the replay backend serves (rkv verify)
    # RKV API v1.1 (rkv-http): bearer tokens of two tenants (the suite calls as the first,
    # isolation probes as the second) and the admin token for reset and faults. Secrets:
    # never logged, redacted in bundles.
    tenant_tokens: tuple[str, ...] = ()
    admin_token: str | None = None


@dataclass(frozen=True)
class Routed:
    """Where a routed runtime served a completion, as its answer says."""

    worker: str | None  # the (prefill) worker
    decode_worker: str | None = None
    kv_hit_rate: float | None = None
    reason: dict | None = None  # why it went there, when the runtime says (recorded as evidence)


class Driver(ABC):
    """A backend under test.

    Class attributes describe it to the label computation; instance methods drive it.
    """

    name: ClassVar[str]
    # How deep the RKV semantics sit: "native" (the runtime itself), "adapter" (a plugin
    # loaded into an unmodified runtime), "patch" (a modified runtime), "none" (no claims).
    depth: ClassVar[Depth] = "native"
    # Routed multi-worker backends are the only ones the placement obligation applies to.
    routed: ClassVar[bool] = False
    # Modules the runtime needs in this interpreter; a missing one makes selecting the
    # backend a usage error naming what to install (the registry checks, before any test).
    requires: ClassVar[tuple[str, ...]] = ()
    # The distribution that is the runtime in this interpreter, named in the row's provenance.
    distribution: ClassVar[str | None] = None

    def __init__(self, settings: DriverSettings) -> None:
        self.settings = settings

    @classmethod
    def check_available(cls) -> None:
        """Raise BackendUnavailable (saying what is missing) if this backend cannot run here.
        The default checks `requires`; a runtime living in its own interpreter checks that."""
        missing = [m for m in cls.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise BackendUnavailable(f"needs {', '.join(missing)}, not installed here")

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        """Bring the backend up (or attach to it). Raise ServerStartError on failure."""

    def stop(self) -> None:
        """Stop everything `start` started. Must be safe to call twice, or after a failed start."""

    def check_alive(self) -> None:
        """Raise BackendCrashed (with the log tail) if the backend has died."""

    def log_tail(self, lines: int = 40) -> str:
        return ""

    def describe(self) -> dict:
        """JSON facts about the runtime for the row (name, version, build)."""
        info = self.info()
        facts = {"runtime": info.runtime, "runtime_version": info.runtime_version}
        if self.distribution:  # the installed distribution whose files the row's provenance hashes
            facts["distribution"] = self.distribution
        return facts

    # -- RKV API v1 ------------------------------------------------------------------
    @abstractmethod
    def info(self) -> RuntimeInfo: ...

    @abstractmethod
    def reset(self) -> None:
        """Return to an empty pool with no claims, and verify it is empty."""

    @abstractmethod
    def complete(self, req: CompletionRequest) -> Reply[Completion]: ...

    def claim(self, req: ClaimRequest) -> Reply[Claim]:
        raise Unsupported(f"{self.name} has no claim API")

    def get_claim(self, claim_id: str) -> Reply[Claim]:
        raise Unsupported(f"{self.name} has no claim API")

    def release(self, claim_id: str) -> Reply[Claim]:
        raise Unsupported(f"{self.name} has no claim API")

    def list_claims(self) -> list[Claim]:
        """`GET /v1/kv/claims`: every claim the caller may see."""
        raise Unsupported(f"{self.name} has no claim API")

    def events(self, after: int = 0) -> list[Event]:
        """Claim lifecycle and request events with seq > after, in seq order as served."""
        raise Unsupported(f"{self.name} publishes no claim lifecycle events")

    def event_page(self, after: int, limit: int) -> EventPage:
        """One page of at most `limit` events with seq > after, as the runtime serves it."""
        raise Unsupported(f"{self.name} publishes no claim lifecycle events")

    def pool(self) -> PoolState:
        raise Unsupported(f"{self.name} reports no pool state")

    def other_tenant(self) -> "Driver":
        """The same backend as seen by a second tenant (claim-isolation probes): a driver
        whose calls carry another tenant's identity. Unsupported(scope="feature") when the
        runtime declares no tenancy; scope="probe" when it does but no second identity is
        configured."""
        raise Unsupported(f"{self.name} declares no tenancy")

    def inject_fault(self, req: FaultRequest) -> None:
        raise Unsupported(f"{self.name} offers no fault injection", scope="probe")

    # -- lowering probes: the runtime's own nearby features ---------------------------
    def complete_at_priority(self, req: CompletionRequest, priority: int) -> Reply[Completion]:
        """A completion at a scheduling priority (lower value = more favoured), for the
        "request priority as hard claim" lowering probe."""
        raise Unsupported(f"{self.name} has no request priority")

    def complete_in_held_session(self, req: CompletionRequest) -> Reply[Completion]:
        """A completion in a runtime session that keeps its KV held after the answer (until
        `close_held_sessions`, `reset`, or the runtime's own idle timeout), for the
        "streaming session as hard claim" lowering probe."""
        raise Unsupported(f"{self.name} has no sessions that hold KV")

    def close_held_sessions(self) -> None:
        """Release every session `complete_in_held_session` opened."""

    def metrics(self) -> dict[str, float]:
        """Scraped runtime counters (name{labels} -> value), recorded as evidence only."""
        return {}

    # -- substrate evidence (block level, no claims) ---------------------------------
    def block_events(self, after: int = 0) -> list[Event]:
        """Block-level cache events (`blocks.stored` / `blocks.evicted`) with seq > after.

        The default takes them from the RKV event stream; runtimes with a native block
        event feed (vLLM's KV events) override this."""
        return [e for e in self.events(after) if e.type.value.startswith("blocks.")]

    # -- routed backends: the runtime's own router and its workers --------------------
    def workers(self) -> list[str]:
        """The worker ids of a routed deployment."""
        raise Unsupported(f"{self.name} names no workers", scope="probe")

    def place(self, req: ClaimRequest) -> Reply[Claim]:
        """A claim placed by the runtime's own placement (which worker holds it is the
        runtime's decision; the claim names it). `claim` is the single-pool call."""
        raise Unsupported(f"{self.name} places no claims across workers (no claim API on its router)")

    def placement_reason(self, claim_id: str) -> dict | None:
        """Why the runtime placed a claim on its worker, when it says (recorded as evidence)."""
        return None

    def route(self, req: CompletionRequest, worker: str | None = None) -> tuple[Reply[Completion], Routed]:
        """A completion placed by the runtime's own router (or forced to `worker` with the
        runtime's own hint), and where it was served."""
        raise Unsupported(f"{self.name} offers no routed completion that names its worker", scope="probe")

    def worker_block_events(self, worker: str, after: int = 0) -> list[Event]:
        """`block_events` of one worker."""
        raise Unsupported(f"{self.name} publishes no per-worker block events", scope="probe")

    # -- time ------------------------------------------------------------------------
    def wait(self, seconds: float) -> None:
        """Let `seconds` pass on the backend's clock (real time unless it has a fake one)."""
        time.sleep(seconds)
