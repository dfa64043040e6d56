"""Drivers that speak RKV API v1 over HTTP.

* `RkvHttpDriver` (`rkv-http`): any server at `--rkv-url`.
* `ReferenceHttpDriver` (`reference-http`): spawns `rkv serve` and talks to it for real.
"""

from __future__ import annotations

import copy
import os
import re
import secrets
import sys
from typing import TypeVar

import requests
from pydantic import BaseModel, ValidationError

from pytest_rkv.contract import (
    Claim,
    ClaimList,
    ClaimRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Event,
    EventPage,
    FaultRequest,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.drivers.base import Driver, Reply
from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.drivers.reference import TENANT_BUDGET_BLOCKS, TENANTS
from pytest_rkv.errors import (
    BackendCrashed,
    HarnessError,
    NoAnswer,
    ProtocolViolation,
    ServerStartError,
    Unsupported,
)
from pytest_rkv.reference.tenants import ADMIN_TOKEN_ENV, TOKENS_ENV

M = TypeVar("M", bound=BaseModel)
TIMEOUT = 30.0


def parse_reply(method: str, path: str, resp: requests.Response, model: type[M]) -> Reply[M]:
    """An RKV API v1 answer as a Reply; anything outside the API is a ProtocolViolation."""
    try:
        payload = resp.json()
    except ValueError:
        raise ProtocolViolation(
            f"{method} {path} answered {resp.status_code} with a non-JSON body: {resp.text[:300]!r}"
        ) from None
    try:
        if resp.ok:
            return Reply(resp.status_code, value=model.model_validate(payload))
        return Reply(resp.status_code, error=ErrorResponse.model_validate(payload).error)
    except ValidationError as exc:
        raise ProtocolViolation(
            f"{method} {path} answered {resp.status_code} with a body outside RKV API v1:\n{exc}"
        ) from None


class RkvHttpDriver(Driver):
    name = "rkv-http"
    depth = "native"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.base_url = (settings.url or "").rstrip("/")
        self.tokens, self.admin_token = tuple(settings.tenant_tokens), settings.admin_token
        self.http = self._session(self.tokens[0] if self.tokens else None)

    @staticmethod
    def _session(token: str | None) -> requests.Session:
        session = requests.Session()
        if token:
            session.headers["Authorization"] = f"Bearer {token}"
        return session

    def _admin_headers(self) -> dict[str, str] | None:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else None

    def start(self) -> None:
        if not self.base_url:
            raise HarnessError("backend rkv-http needs --rkv-url (the RKV API v1 server to test)")
        try:
            self.info()
        except (HarnessError, ProtocolViolation, Unsupported) as exc:
            raise ServerStartError(
                f"cannot reach an RKV API v1 server at {self.base_url}: {exc}\n"
                "  check that the server is running, that --rkv-url is right, "
                "and that it serves GET /v1/kv/info"
            ) from None

    def stop(self) -> None:
        self.http.close()

    # -- plumbing --------------------------------------------------------------------
    def _call(self, method: str, path: str, model: type[M], body: BaseModel | None = None,
              params: dict | None = None, headers: dict | None = None,
              answer_wait: float | None = None) -> Reply[M]:
        """One API call. With `answer_wait`, a server that is alive but does not answer
        within that many seconds raises `NoAnswer` (the bounded wait for completions)."""
        try:
            resp = self.http.request(
                method, self.base_url + path, params=params, headers=headers,
                timeout=(TIMEOUT, answer_wait or TIMEOUT),
                json=None if body is None else body.model_dump(mode="json", exclude_none=True),
            )
        except requests.ReadTimeout as exc:
            self.check_alive()  # a dead server is BackendCrashed, never a silent runtime
            if answer_wait is None:
                raise HarnessError(f"{method} {path} failed: {exc.__class__.__name__}: {exc}") from None
            raise NoAnswer(answer_wait, f"{method} {path} sent; the server is alive but did not answer") from None
        except requests.RequestException as exc:
            self.check_alive()
            raise HarnessError(f"{method} {path} failed: {exc.__class__.__name__}: {exc}") from None
        return parse_reply(method, path, resp, model)

    def _get(self, path: str, model: type[M], **params) -> M:
        reply = self._call("GET", path, model, params=params or None)
        if reply.status == 404 and path.startswith("/v1/kv/") and not path.startswith("/v1/kv/claims/"):
            raise Unsupported(f"{self.base_url} has no {path} route")
        return reply.unwrap()

    # -- RKV API v1 ------------------------------------------------------------------
    def info(self) -> RuntimeInfo:
        return self._get("/v1/kv/info", RuntimeInfo)

    def reset(self) -> None:
        reply = self._call("POST", "/v1/kv/reset", PoolState, headers=self._admin_headers())
        if reply.status in (404, 501):
            raise HarnessError(f"{self.base_url} offers no POST /v1/kv/reset; tests cannot start from a clean pool "
                               "(an RKV API v1.1 server needs an admin token: --rkv-admin-token)")
        if reply.status in (401, 403):
            raise HarnessError(f"{self.base_url} refused POST /v1/kv/reset ({reply.status}): "
                               "check --rkv-admin-token")
        pool = reply.unwrap()
        if pool.claimed_blocks or pool.active_blocks or pool.free_blocks != pool.total_blocks:
            raise HarnessError(f"pool not empty after reset: {pool}")

    def claim(self, req: ClaimRequest) -> Reply[Claim]:
        return self._call("POST", "/v1/kv/claims", Claim, req)

    def get_claim(self, claim_id: str) -> Reply[Claim]:
        return self._call("GET", f"/v1/kv/claims/{claim_id}", Claim)

    def release(self, claim_id: str) -> Reply[Claim]:
        return self._call("DELETE", f"/v1/kv/claims/{claim_id}", Claim)

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        return self._call("POST", "/v1/completions", Completion, req,
                          answer_wait=self.settings.refusal_timeout)

    def list_claims(self) -> list[Claim]:
        return self._get("/v1/kv/claims", ClaimList).claims

    def event_page(self, after: int, limit: int) -> EventPage:
        return self._get("/v1/kv/events", EventPage, after=after, limit=limit)

    def events(self, after: int = 0) -> list[Event]:
        found: list[Event] = []
        while True:  # v1 servers answer one page with no `more`
            page = self._get("/v1/kv/events", EventPage, after=after)
            found += page.events
            if not page.more or page.last_seq <= after:
                return found
            after = page.last_seq

    def other_tenant(self) -> "RkvHttpDriver":
        if not self.info().tenancy:
            raise Unsupported(f"{self.base_url} declares no tenancy (GET /v1/kv/info: tenancy false)")
        if len(self.tokens) < 2:
            raise Unsupported(f"{self.base_url} declares tenancy, but no second tenant's token is configured "
                              "(--rkv-tenant-tokens=TOKEN_A,TOKEN_B)", scope="probe")
        view = copy.copy(self)
        view.http = self._session(self.tokens[1])
        return view

    def pool(self) -> PoolState:
        return self._get("/v1/kv/pool", PoolState)

    def inject_fault(self, req: FaultRequest) -> None:
        reply = self._call("POST", "/v1/kv/faults", FaultRequest, req, headers=self._admin_headers())
        if reply.status in (404, 501):
            raise Unsupported(f"{self.base_url} offers no fault injection route", scope="probe")
        reply.unwrap()


_LISTEN = re.compile(r"RKV API v1 listening on (http://\S+)")


class ReferenceHttpDriver(RkvHttpDriver):
    """The reference runtime in its own process, over real HTTP on loopback."""

    name = "reference-http"
    distribution = "pytest-rkv"

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.server: ManagedProcess | None = None

    def start(self) -> None:
        log_path = self.settings.workdir / "reference-http.log"
        argv = [sys.executable, "-m", "pytest_rkv.cli", "serve", "--port", "0",
                "--block-size", str(self.settings.block_size or 16),
                "--tenant-budget", str(TENANT_BUDGET_BLOCKS)]
        for fault in sorted(self.settings.reference_faults):
            argv += ["--fault", fault]
        # Fresh secrets per start, handed over in the environment (never on the command
        # line, which `ps` and the evidence show).
        self.tokens = tuple(secrets.token_urlsafe(16) for _ in TENANTS)
        self.admin_token = secrets.token_urlsafe(16)
        env = {**os.environ, TOKENS_ENV: ",".join(f"{t}={n}" for t, n in zip(self.tokens, TENANTS)),
               ADMIN_TOKEN_ENV: self.admin_token}
        self.http = self._session(self.tokens[0])
        self.server = ManagedProcess(argv, log_path=log_path, name="rkv serve", env=env)

        def ready() -> bool:
            found = _LISTEN.findall(self.server.log_tail(200))
            if found:
                self.base_url = found[-1]
                self.info()
                return True
            return False

        self.server.start(ready, timeout=self.settings.startup_timeout)

    def stop(self) -> None:
        super().stop()
        if self.server is not None:
            self.server.stop()

    def check_alive(self) -> None:
        if self.server is not None:
            self.server.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        return self.server.log_tail(lines) if self.server else ""


__all__ = ["RkvHttpDriver", "ReferenceHttpDriver", "BackendCrashed"]
