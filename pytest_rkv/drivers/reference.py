"""`reference`: the MicroRuntime in this process, called directly (no HTTP, no sockets).

It goes through exactly the same models as `reference-http`, so the two rows must agree;
only the transport differs. Time runs on a fake clock, so expiry tests take no wall time.
"""

from __future__ import annotations

from pytest_rkv.contract import (
    Claim,
    ClaimRequest,
    Completion,
    CompletionRequest,
    Event,
    FaultRequest,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.drivers.base import Driver, Reply
from pytest_rkv.errors import HarnessError, NoAnswer, Unsupported
from pytest_rkv.reference.runtime import ApiError, FakeClock, MicroRuntime


class ReferenceDriver(Driver):
    name = "reference"
    depth = "native"

    def start(self) -> None:
        self.clock = FakeClock()
        self.runtime = MicroRuntime(
            block_size=self.settings.block_size or 16,
            clock=self.clock,
            faults=self.settings.reference_faults,
            park=self._no_answer,
        )

    def _no_answer(self, request_id: str) -> None:
        """A parked request (fault `queue_blocked_requests`): the bounded wait passes on
        the fake clock, and the caller gets what an HTTP driver raises after it."""
        self.clock.advance(self.settings.refusal_timeout)
        raise NoAnswer(self.settings.refusal_timeout, f"request {request_id} sent; no answer")

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
        return self._reply(self.runtime.create_claim, req)

    def get_claim(self, claim_id: str) -> Reply[Claim]:
        return self._reply(self.runtime.get_claim, claim_id)

    def release(self, claim_id: str) -> Reply[Claim]:
        return self._reply(self.runtime.release_claim, claim_id)

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        return self._reply(self.runtime.complete, req)

    def events(self, after: int = 0) -> list[Event]:
        return self.runtime.events(after).events

    def pool(self) -> PoolState:
        return self.runtime.pool_state()

    def inject_fault(self, req: FaultRequest) -> None:
        try:
            self.runtime.inject_fault(req)
        except ApiError as exc:
            if exc.status == 501:
                raise Unsupported(exc.body.message, scope="probe") from None
            raise HarnessError(str(exc)) from None

    def wait(self, seconds: float) -> None:
        self.clock.advance(seconds)
