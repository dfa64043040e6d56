"""RKV API v1 over HTTP for the MicroRuntime (stdlib server, loopback by default).

Routes (the normative list is `ROUTES`, from which `openapi()` builds the document):

    GET    /health
    GET    /v1/kv/info
    POST   /v1/kv/claims            ClaimRequest      -> 201 Claim | 409 no_admit
    GET    /v1/kv/claims            -> {"claims": [Claim]}
    GET    /v1/kv/claims/{id}       -> Claim | 404
    DELETE /v1/kv/claims/{id}       -> Claim (released) | 404
    GET    /v1/kv/events?after=SEQ  -> EventPage
    GET    /v1/kv/pool              -> PoolState
    POST   /v1/kv/reset             -> PoolState (empty)
    POST   /v1/kv/faults            FaultRequest      -> 200 | 501 when not enabled
    POST   /v1/completions          CompletionRequest -> Completion | 409 active_refusal
"""

from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError

from pytest_rkv.contract import (
    API_VERSION,
    Claim,
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
from pytest_rkv.reference.runtime import ApiError, MicroRuntime

# (method, path pattern, request model, response model, summary)
ROUTES: list[tuple[str, str, type[BaseModel] | None, type[BaseModel] | None, str]] = [
    ("GET", "/v1/kv/info", None, RuntimeInfo, "Who answers, its pool geometry and optional features."),
    ("POST", "/v1/kv/claims", ClaimRequest, Claim, "Ask for a resident claim on a prompt prefix."),
    ("GET", "/v1/kv/claims/{claim_id}", None, Claim, "One claim's current state."),
    ("DELETE", "/v1/kv/claims/{claim_id}", None, Claim, "Release a claim."),
    ("GET", "/v1/kv/events", None, EventPage, "Events with seq > `after`, in seq order."),
    ("GET", "/v1/kv/pool", None, PoolState, "Block accounting of the pool."),
    ("POST", "/v1/kv/reset", None, PoolState, "Drop every claim and cached block (test isolation)."),
    ("POST", "/v1/kv/faults", FaultRequest, FaultRequest, "Arm a fault (opt-in; 501 when disabled)."),
    ("POST", "/v1/completions", CompletionRequest, Completion, "OpenAI-compatible completion on token ids."),
]


def make_handler(runtime: MicroRuntime) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes
        server_version = "rkv-reference/1"

        def log_message(self, fmt: str, *args) -> None:  # one line per request, to the log
            print(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else '?'}", flush=True)

        # -- helpers -----------------------------------------------------------------
        def _send(self, status: int, payload: BaseModel | dict) -> None:
            data = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, body: ErrorBody) -> None:
            self._send(status, ErrorResponse(error=body))

        def _body(self, model: type[BaseModel]) -> BaseModel:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return model.model_validate_json(raw or b"{}")
            except ValidationError as exc:
                fields = [
                    {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors(include_url=False, include_input=False)
                ]
                raise ApiError(422, ErrorBody(
                    type="invalid_request",
                    message=f"{model.__name__}: " + "; ".join(
                        f"{'.'.join(map(str, f['loc'])) or 'body'}: {f['msg']}" for f in fields
                    ),
                    fields=fields,
                )) from None

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            path, query = url.path.rstrip("/") or "/", parse_qs(url.query)
            method = self.command
            try:
                if method == "GET" and path == "/health":
                    return self._send(200, {"status": "ok", "api_version": API_VERSION})
                if method == "GET" and path == "/v1/kv/info":
                    return self._send(200, runtime.info())
                if method == "GET" and path == "/v1/kv/pool":
                    return self._send(200, runtime.pool_state())
                if method == "POST" and path == "/v1/kv/reset":
                    runtime.reset()
                    return self._send(200, runtime.pool_state())
                if method == "GET" and path == "/v1/kv/events":
                    try:
                        after = int(query.get("after", ["0"])[0])
                    except ValueError:
                        raise ApiError(422, ErrorBody(
                            type="invalid_request", message="after: must be an integer",
                            fields=[{"loc": ["query", "after"], "msg": "must be an integer"}],
                        )) from None
                    return self._send(200, runtime.events(after))
                if method == "POST" and path == "/v1/kv/claims":
                    return self._send(201, runtime.create_claim(self._body(ClaimRequest)))
                if method == "GET" and path == "/v1/kv/claims":
                    return self._send(200, {"claims": [c.model_dump(mode="json") for c in runtime.list_claims()]})
                found = re.fullmatch(r"/v1/kv/claims/([^/]+)", path)
                if found and method == "GET":
                    return self._send(200, runtime.get_claim(found.group(1)))
                if found and method == "DELETE":
                    return self._send(200, runtime.release_claim(found.group(1)))
                if method == "POST" and path == "/v1/kv/faults":
                    req = self._body(FaultRequest)
                    runtime.inject_fault(req)
                    return self._send(200, req)
                if method == "POST" and path == "/v1/completions":
                    return self._send(200, runtime.complete(self._body(CompletionRequest)))
                if method == "GET" and path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": "rkv-reference", "object": "model"}]})
                raise ApiError(404, ErrorBody(type="not_found", message=f"no route {method} {path}"))
            except ApiError as exc:
                self._error(exc.status, exc.body)

        do_GET = do_POST = do_DELETE = _dispatch

    return Handler


def serve(runtime: MicroRuntime, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Bind (port 0 picks a free one, so parallel workers never collide) and return."""
    server = ThreadingHTTPServer((host, port), make_handler(runtime))
    server.daemon_threads = True
    return server


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
        op: dict = {"summary": summary, "responses": {"default": error}}
        if resp is not None:
            code = "201" if (method, route) == ("POST", "/v1/kv/claims") else "200"
            op["responses"][code] = {"description": "ok", "content": {"application/json": {"schema": ref(resp)}}}
        if req is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref(req)}}}
        if "{claim_id}" in route:
            op["parameters"] = [{"name": "claim_id", "in": "path", "required": True, "schema": {"type": "string"}}]
        if route == "/v1/kv/events":
            op["parameters"] = [{"name": "after", "in": "query", "schema": {"type": "integer", "default": 0}}]
        paths.setdefault(route, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "RKV API", "version": API_VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }
