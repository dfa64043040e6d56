"""RKV API v1.1 over HTTP for the MicroRuntime: Starlette on uvicorn (loopback by default).

Routes (the normative list is `ROUTES`, from which `openapi()` builds the document):

    GET    /health
    GET    /v1/kv/info
    POST   /v1/kv/claims            ClaimRequest      -> 201 Claim | 409 no_admit
    GET    /v1/kv/claims            -> {"claims": [Claim]}
    GET    /v1/kv/claims/{id}       -> Claim | 404
    DELETE /v1/kv/claims/{id}       -> Claim (released) | 404
    GET    /v1/kv/events?after=SEQ&limit=N -> EventPage
    GET    /v1/kv/pool              -> PoolState
    POST   /v1/kv/reset             -> PoolState (empty)          admin token
    POST   /v1/kv/faults            FaultRequest -> 200            admin token
    POST   /v1/completions          CompletionRequest -> Completion | 409 active_refusal

Every non-2xx answer, including the ones the HTTP layer gives before a route runs (400
unparsable, 404, 405, 408, 413, 414, 431), is an `ErrorResponse` JSON body. Callers are
resolved from `Authorization: Bearer` by `tenants.Tenancy`.

Limits (`Limits`): body size, URL and header size, a header read timeout (slow or partial
headers get 408 and the connection is closed), a body read timeout, a keep-alive timeout
and a request count per connection, and a listen backlog large enough for bursts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
from dataclasses import dataclass

import h11
import uvicorn
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.flow_control import CLOSE_HEADER
from uvicorn.protocols.http.h11_impl import H11Protocol

from pytest_rkv.contract import (
    API_REVISION,
    API_VERSION,
    Claim,
    ClaimList,
    ClaimRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    EventPage,
    FaultRequest,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.reference.runtime import EVENT_PAGE_LIMIT, ApiError, MicroRuntime
from pytest_rkv.reference.tenants import AuthError, Caller, Tenancy

log = logging.getLogger("rkv.server")

# (method, path pattern, request model, response model, summary)
ROUTES: list[tuple[str, str, type[BaseModel] | None, type[BaseModel] | None, str]] = [
    ("GET", "/v1/kv/info", None, RuntimeInfo, "Who answers, its pool geometry and optional features."),
    ("POST", "/v1/kv/claims", ClaimRequest, Claim, "Ask for a resident claim on a prompt prefix."),
    ("GET", "/v1/kv/claims", None, ClaimList, "The caller's claims, live and recently ended."),
    ("GET", "/v1/kv/claims/{claim_id}", None, Claim, "One claim's current state (404 for another tenant's)."),
    ("DELETE", "/v1/kv/claims/{claim_id}", None, Claim, "Release a claim (404 for another tenant's)."),
    ("GET", "/v1/kv/events", None, EventPage, "Events with seq > `after` the caller may see, in seq order, one page."),
    ("GET", "/v1/kv/pool", None, PoolState, "Block accounting of the pool."),
    ("POST", "/v1/kv/reset", None, PoolState, "Drop every claim and cached block (admin token; 501 when none is configured)."),
    ("POST", "/v1/kv/faults", FaultRequest, FaultRequest, "Arm a fault (admin token; 501 when none is configured)."),
    ("POST", "/v1/completions", CompletionRequest, Completion, "OpenAI-compatible completion on token ids."),
]
ADMIN_ROUTES = {"/v1/kv/reset", "/v1/kv/faults"}
_CLAIM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,256}")
_SEQ = re.compile(r"\d{1,18}")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 4 * 1024 * 1024  # a 128k-token prompt is about 1 MB of JSON
    max_head_bytes: int = 16 * 1024  # request line plus headers
    max_url_bytes: int = 8 * 1024
    header_timeout_s: float = 10.0  # from connection (or previous response) to full headers
    body_timeout_s: float = 10.0
    keep_alive_s: float = 5.0
    requests_per_connection: int = 1000
    backlog: int = 2048


# -- errors as JSON, everywhere ------------------------------------------------------


def _json(status: int, payload: BaseModel | dict, headers: dict | None = None) -> Response:
    data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    body = json.dumps(data, allow_nan=False).encode()
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _error(status: int, type_: str, message: str, **fields) -> Response:
    return _json(status, ErrorResponse(error=ErrorBody(type=type_, message=message, **fields)))


def _raw_error(status: int, reason: str, type_: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response as bytes, for the protocol layer (no request parsed)."""
    body = json.dumps({"error": {"type": type_, "message": message}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class RkvH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with JSON protocol errors, a header read timeout and a
    request count per connection. (uvicorn answers unparsable requests with a text/plain
    400 and waits forever for headers that never complete.)"""

    limits = Limits()

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._served = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.limits.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # a request started and never finished its headers
            self.transport.write(_raw_error(408, "Request Timeout", "timeout",
                                            f"request headers not received within {self.limits.header_timeout_s:g}s"))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_header_timer()
        try:
            super().data_received(data)
        except Exception as exc:  # e.g. a non-ASCII path uvicorn cannot decode
            log.warning("unparsable request: %s", exc.__class__.__name__)
            self.send_400_response(str(exc))
            return
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()
            if self.cycle is not None and id(self.cycle) != getattr(self, "_counted", None):
                self._counted = id(self.cycle)
                self._served += 1
                if self._served >= self.limits.requests_per_connection:
                    # uvicorn echoes a request's "connection: close" on the response, then closes
                    self.cycle.scope["headers"].append(CLOSE_HEADER)
                    self.cycle.keep_alive = False

    def send_400_response(self, msg: str) -> None:
        pending = len(self.conn.trailing_data[0])
        if pending >= self.limits.max_head_bytes:
            first_line_done = b"\r\n" in bytes(self.conn.trailing_data[0][: self.limits.max_url_bytes + 16])
            if first_line_done:
                out = _raw_error(431, "Request Header Fields Too Large", "too_large",
                                 f"request headers exceed {self.limits.max_head_bytes} bytes")
            else:
                out = _raw_error(414, "URI Too Long", "too_large",
                                 f"request line exceeds {self.limits.max_head_bytes} bytes")
        else:
            out = _raw_error(400, "Bad Request", "bad_request", "not a valid HTTP/1.1 request")
        if not self.transport.is_closing():
            self.transport.write(out)
            self.transport.close()


# -- the application -------------------------------------------------------------------


def make_app(runtime: MicroRuntime, tenancy: Tenancy = Tenancy(), limits: Limits = Limits()):
    def caller(request: Request) -> Caller:
        try:
            return tenancy.caller(request.headers.get("authorization"))
        except AuthError as exc:
            raise _Refused(_error(exc.status, "unauthorized", str(exc))) from None

    def admin(request: Request) -> None:
        try:
            tenancy.admin(caller(request))
        except AuthError as exc:
            kind = {401: "unauthorized", 403: "forbidden", 501: "unsupported"}[exc.status]
            raise _Refused(_error(exc.status, kind, str(exc))) from None

    async def body(request: Request, model: type[BaseModel]) -> BaseModel:
        length = request.headers.get("content-length")
        if length is not None and int(length) > limits.max_body_bytes:  # h11 checked it is digits
            raise _Refused(_error(413, "too_large", f"body of {length} bytes exceeds {limits.max_body_bytes}"))
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise _Refused(_error(413, "too_large", f"body exceeds {limits.max_body_bytes} bytes"))
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), limits.body_timeout_s)
        except TimeoutError:
            raise _Refused(_json(408, ErrorResponse(error=ErrorBody(
                type="timeout", message=f"body not received within {limits.body_timeout_s:g}s")),
                headers={"connection": "close"})) from None
        raw = b"".join(chunks)
        try:
            return model.model_validate_json(raw or b"{}")
        except ValidationError as exc:
            fields = [
                {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False, include_context=False)
            ]
            raise _Refused(_json(422, ErrorResponse(error=ErrorBody(
                type="invalid_request",
                message=f"{model.__name__}: " + "; ".join(
                    f"{'.'.join(map(str, f['loc'])) or 'body'}: {f['msg']}" for f in fields)[:2000],
                fields=fields[:50],
            )))) from None

    def query_int(request: Request, name: str, default: int) -> int:
        values = request.query_params.getlist(name)
        if not values:
            return default
        if len(values) > 1 or not _SEQ.fullmatch(values[0]):
            raise _Refused(_error(422, "invalid_request", f"{name}: must be one non-negative integer",
                                  fields=[{"loc": ["query", name], "msg": "must be a non-negative integer"}]))
        return int(values[0])

    def claim_id(request: Request) -> str:
        value = request.path_params["claim_id"]
        if not _CLAIM_ID.fullmatch(value):
            raise _Refused(_error(404, "not_found", "no such claim"))
        return value

    def endpoint(handler):
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except _Refused as refused:
                return refused.response
            except ApiError as exc:
                return _json(exc.status, ErrorResponse(error=exc.body))
        return run

    async def health(request: Request) -> Response:
        return _json(200, {"status": "ok", "api_version": API_VERSION, "api_revision": API_REVISION})

    async def info(request: Request) -> Response:
        caller(request)
        return _json(200, runtime.info())

    async def create_claim(request: Request) -> Response:
        who = caller(request)
        return _json(201, runtime.create_claim(await body(request, ClaimRequest), tenant=who.tenant))

    async def list_claims(request: Request) -> Response:
        who = caller(request)
        return _json(200, {"claims": [c.model_dump(mode="json") for c in runtime.list_claims(tenant=who.tenant)]})

    async def get_claim(request: Request) -> Response:
        who = caller(request)
        return _json(200, runtime.get_claim(claim_id(request), tenant=who.tenant))

    async def release_claim(request: Request) -> Response:
        who = caller(request)
        return _json(200, runtime.release_claim(claim_id(request), tenant=who.tenant))

    async def events(request: Request) -> Response:
        who = caller(request)
        after = query_int(request, "after", 0)
        limit = query_int(request, "limit", EVENT_PAGE_LIMIT)
        if not 1 <= limit <= EVENT_PAGE_LIMIT:
            raise _Refused(_error(422, "invalid_request", f"limit: must be 1..{EVENT_PAGE_LIMIT}",
                                  fields=[{"loc": ["query", "limit"], "msg": f"must be 1..{EVENT_PAGE_LIMIT}"}]))
        return _json(200, runtime.events(after, limit, tenant=who.tenant))

    async def pool(request: Request) -> Response:
        who = caller(request)
        return _json(200, runtime.pool_state(tenant=who.tenant))

    async def reset(request: Request) -> Response:
        admin(request)
        runtime.reset()
        return _json(200, runtime.pool_state())

    async def faults(request: Request) -> Response:
        admin(request)
        req = await body(request, FaultRequest)
        runtime.inject_fault(req)
        return _json(200, req)

    async def complete(request: Request) -> Response:
        who = caller(request)
        req = await body(request, CompletionRequest)
        # In a worker thread: a request the runtime parks (fault queue_blocked_requests) must
        # leave this server answering everyone else, as a real runtime's queue does.
        return _json(200, await run_in_threadpool(runtime.complete, req, tenant=who.tenant))

    async def models(request: Request) -> Response:
        caller(request)
        return _json(200, {"object": "list", "data": [{"id": "rkv-reference", "object": "model"}]})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return _error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
        if exc.status_code == 404:
            return _error(404, "not_found", f"no route {request.method} {request.url.path}"[:300])
        return _error(exc.status_code, "bad_request", str(exc.detail)[:300])

    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal", "internal error; see the server log")

    routes = [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/kv/info", endpoint(info), methods=["GET"]),
        Route("/v1/kv/claims", endpoint(create_claim), methods=["POST"]),
        Route("/v1/kv/claims", endpoint(list_claims), methods=["GET"]),
        Route("/v1/kv/claims/{claim_id:path}", endpoint(get_claim), methods=["GET"]),
        Route("/v1/kv/claims/{claim_id:path}", endpoint(release_claim), methods=["DELETE"]),
        Route("/v1/kv/events", endpoint(events), methods=["GET"]),
        Route("/v1/kv/pool", endpoint(pool), methods=["GET"]),
        Route("/v1/kv/reset", endpoint(reset), methods=["POST"]),
        Route("/v1/kv/faults", endpoint(faults), methods=["POST"]),
        Route("/v1/completions", endpoint(complete), methods=["POST"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal})
    return _guarded(app, limits)


def _guarded(app, limits: Limits):
    """Size limits on the request head, before routing. (h11 refuses a head that has not
    ended within its buffer size; one that arrives whole but too large gets here.)"""

    async def guard(scope, receive, send) -> None:
        if scope["type"] == "http":
            url = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
            head = url + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if url > limits.max_url_bytes:
                response = _error(414, "too_large", f"URL exceeds {limits.max_url_bytes} bytes")
                return await response(scope, receive, send)
            if head > limits.max_head_bytes:
                response = _error(431, "too_large", f"request headers exceed {limits.max_head_bytes} bytes")
                return await response(scope, receive, send)
        await app(scope, receive, send)

    return guard


# -- the server ----------------------------------------------------------------------------


class RkvServer:
    """A bound, not yet serving, uvicorn server. Binding happens in the constructor, so a
    bad host or a port in use fails at once (OSError) and port 0 is resolved before
    anything is printed."""

    def __init__(self, app, host: str, port: int, limits: Limits) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.create_server((host, port), family=family, backlog=limits.backlog)
        self.server_address = self.socket.getsockname()[:2]
        protocol = type("BoundRkvH11Protocol", (RkvH11Protocol,), {"limits": limits})
        config = uvicorn.Config(
            app, http=protocol, lifespan="off", log_config=None, log_level="warning", access_log=False,
            timeout_keep_alive=int(max(1, limits.keep_alive_s)), backlog=limits.backlog,
            h11_max_incomplete_event_size=limits.max_head_bytes, server_header=False,
            timeout_graceful_shutdown=2,
        )
        self.uvicorn = uvicorn.Server(config)
        self._stopped = threading.Event()

    def serve_forever(self) -> None:
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        self._stopped.wait(10)

    def server_close(self) -> None:
        self.socket.close()


def serve(runtime: MicroRuntime, host: str = "127.0.0.1", port: int = 0,
          tenancy: Tenancy = Tenancy(), limits: Limits = Limits()) -> RkvServer:
    """Bind (port 0 picks a free one, so parallel workers never collide) and return."""
    return RkvServer(make_app(runtime, tenancy, limits), host, port, limits)


def openapi() -> dict:
    """An OpenAPI 3.1 document generated from the contract's models."""
    schemas: dict[str, dict] = {}

    def ref(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"description": "error", "content": {"application/json": {"schema": ref(ErrorResponse)}}}
    paths: dict[str, dict] = {}
    for method, route, req, resp, summary in ROUTES:
        op: dict = {"summary": summary, "responses": {"default": error}, "security": [{}, {"bearer": []}]}
        if resp is not None:
            code = "201" if (method, route) == ("POST", "/v1/kv/claims") else "200"
            op["responses"][code] = {"description": "ok", "content": {"application/json": {"schema": ref(resp)}}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(req)}}}
        if "{claim_id}" in route:
            op["parameters"] = [{"name": "claim_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if route == "/v1/kv/events":
            op["parameters"] = [
                {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0, "default": 0}},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": EVENT_PAGE_LIMIT, "default": EVENT_PAGE_LIMIT}},
            ]
        if route in ADMIN_ROUTES:
            op["security"] = [{"bearer": []}]
        paths.setdefault(route, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "RKV API", "version": f"{API_VERSION} (revision {API_REVISION})"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "A tenant's token (claims are scoped to the tenant) or the admin token "
                               "(reset, faults, every tenant's view). Optional on servers without tenants.",
            }},
        },
    }
