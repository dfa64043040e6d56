"""`reference`: the MicroRuntime in this process, called directly (no HTTP, no sockets).

It goes through exactly the same models as `reference-http`, so the two rows must agree;
only the transport differs. Time runs on a fake clock, so expiry tests take no wall time.
Like `reference-http`, the runtime has two tenants: the suite calls as `TENANTS[0]`,
isolation probes as `TENANTS[1]`; reset and faults are the operator's (no tenant).
"""

from __future__ import annotations

import copy

from pytest_rkv.contract import (
    Claim,
    ClaimRequest,
    Completion,
    CompletionRequest,
    Event,
    EventPage,
    FaultRequest,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.drivers.base import Driver, Reply
from pytest_rkv.errors import HarnessError, NoAnswer, Unsupported
from pytest_rkv.reference.runtime import EVENT_PAGE_LIMIT, ApiError, FakeClock, MicroRuntime

TENANTS = ("tenant-a", "tenant-b")
TENANT_BUDGET_BLOCKS = 60  # the canonical resident claim fits; the global budget is 64


class ReferenceDriver(Driver):
    name = "reference"
    depth = "native"
    distribution = "pytest-rkv"  # the reference runtime ships inside this package

    tenant = TENANTS[0]

    def start(self) -> None:
        self.clock = FakeClock()
        self.runtime = MicroRuntime(
            block_size=self.settings.block_size or 16,
            clock=self.clock,
            faults=self.settings.reference_faults,
            park=self._no_answer,
            tenancy=True,
            tenant_budget_blocks=TENANT_BUDGET_BLOCKS,
        )

    def _no_answer(self, request_id: str) -> None:
        """A parked request (fault `queue_blocked_requests`): the bounded wait passes on
        the fake clock, and the caller gets what an HTTP driver raises after it."""
        self.clock.advance(self.settings.refusal_timeout)
        raise NoAnswer(self.settings.refusal_timeout, f"request {request_id} sent; no answer")

    def other_tenant(self) -> "ReferenceDriver":
        view = copy.copy(self)
        view.tenant = TENANTS[1]
        return view

    def _reply(self, call, *args) -> Reply:
        try:
            return Reply(200, value=call(*args))
        except ApiError as exc:
            return Reply(exc.status, error=exc.body)

    def info(self) -> RuntimeInfo:
        return self.runtime.info()

    def reset(self) -> None:
        self.runtime.reset()
        pool = self.runtime.pool_state()
        if pool.free_blocks != pool.total_blocks:
            raise HarnessError(f"pool not empty after reset: {pool}")

    def claim(self, req: ClaimRequest) -> Reply[Claim]:
        return self._reply(self.runtime.create_claim, req, self.tenant)

    def get_claim(self, claim_id: str) -> Reply[Claim]:
        return self._reply(self.runtime.get_claim, claim_id, self.tenant)

    def release(self, claim_id: str) -> Reply[Claim]:
        return self._reply(self.runtime.release_claim, claim_id, self.tenant)

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        return self._reply(self.runtime.complete, req, self.tenant)

    def list_claims(self) -> list[Claim]:
        return self.runtime.list_claims(tenant=self.tenant)

    def event_page(self, after: int, limit: int) -> EventPage:
        try:
            return self.runtime.events(after, limit, tenant=self.tenant)
        except ValueError as exc:
            raise HarnessError(str(exc)) from None

    def events(self, after: int = 0) -> list[Event]:
        found: list[Event] = []
        while True:
            page = self.runtime.events(after, EVENT_PAGE_LIMIT, tenant=self.tenant)
            found += page.events
            if not page.more:
                return found
            after = page.last_seq

    def pool(self) -> PoolState:
        return self.runtime.pool_state(tenant=self.tenant)

    def inject_fault(self, req: FaultRequest) -> None:
        try:
            self.runtime.inject_fault(req)
        except ApiError as exc:
            if exc.status == 501:
                raise Unsupported(exc.body.message, scope="probe") from None
            raise HarnessError(str(exc)) from None

    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)
