"""RKV API v1 on vLLM's OpenAI API server: a `vllm.endpoint_plugins` entry point.

Registered (pyproject.toml) as

    [project.entry-points."vllm.endpoint_plugins"]
    rkv = "pytest_rkv.adapters.vllm.endpoints:RkvEndpointPlugin"

and loaded only when `VLLM_PLUGINS` names it (`VLLM_PLUGINS=rkv`), as vLLM requires of
every endpoint plugin.

The routes are the reference server's (pytest_rkv/reference/server.py) with the same
bodies. Each claim operation is one engine utility call, `EngineCore.rkv_call(op,
payload)`, answered by the scheduler-side claim book (claims.py) in the engine thread; the
answer is `{"status", "body"}` and goes back to the client as it is.

`POST /v1/completions` and `POST /v1/chat/completions` replace vLLM's routes of the same
paths (endpoint-plugin routes win) and still serve through vLLM's own
`OpenAIServingCompletion` / `OpenAIServingChat`: they only add the contract's fields around
them. In: `claim_id` (checked, 404 if unknown) and the request id go to the engine in
`vllm_xargs`. Out: the scheduler's outcome for the request comes back in the response's
`kv_transfer_params["rkv"]`; a refusal becomes HTTP 409 `active_refusal` (the
ErrorResponse the claim book built, naming the blocking claims and the block arithmetic),
anything else the `rkv` record (`reuse`, `failures`). Streamed answers carry the record on
their last event and answer a refusal with 409 too (streaming.py). Claims may be made from
chat messages, rendered as chat requests render them (chat.py).

Tenants (RKV API v1.1): with `RKV_TOKENS` ("token=tenant,...") in the server's environment,
every route needs `Authorization: Bearer <token>`, checked here by the same rules as the
reference server (`pytest_rkv.reference.tenants`); the engine side gets only the tenant's
name (`payload["_tenant"]`) and scopes claims, events and budgets by it (api.py). A tenant's
completions are salted with its name (`cache_salt`), so tenants share no cached blocks.
Reset and fault injection then need `RKV_ADMIN_TOKEN`.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from pytest_rkv.adapters.vllm import ENGINE_METHOD, PLUGIN_NAME, chat, streaming
from pytest_rkv.adapters.vllm.config import AdapterConfig
from pytest_rkv.contract import EVENT_PAGE_LIMIT, ClaimRequest, FaultRequest
from pytest_rkv.reference.tenants import AuthError, Caller, Tenancy

_AUTH_TYPES = {401: "unauthorized", 403: "forbidden", 501: "unsupported"}


def _error(status: int, type_: str, message: str, **extra: Any) -> dict:
    return {"status": status, "body": {"error": {"type": type_, "message": message, **extra}}}


def _validation_error(model: str, exc: ValidationError) -> dict:
    fields = [
        {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    message = f"{model}: " + "; ".join(
        f"{'.'.join(map(str, f['loc'])) or 'body'}: {f['msg']}" for f in fields
    )
    return _error(422, "invalid_request", message, fields=fields)


def _respond(reply: dict) -> JSONResponse:
    return JSONResponse(reply["body"], status_code=reply["status"])


class Bridge:
    """The API server's handle on the engine-side claim book."""

    def __init__(self, engine_client: Any, config: AdapterConfig) -> None:
        self.engine_client = engine_client
        self.config = config

    async def call(self, op: str, payload: dict | None = None, timeout: float | None = None,
                   caller: Caller | None = None) -> dict:
        core = getattr(self.engine_client, "engine_core", None)
        if core is None:
            return _error(501, "unsupported", "this vLLM server has no engine to hold claims")
        payload = {**(payload or {}), "_tenant": caller.tenant if caller is not None else None}
        try:
            return await asyncio.wait_for(
                core.call_utility_async(ENGINE_METHOD, op, payload),
                timeout or self.config.call_timeout_s,
            )
        except TimeoutError:
            return _error(503, "capacity", f"the engine did not answer {op!r} in time; retry")
        except Exception as exc:  # the engine-side adapter is missing or failed
            return _error(501, "unsupported", f"the RKV adapter did not answer {op!r}: {exc}")


def _bridge(raw: Request) -> Bridge:
    return raw.app.state.rkv_bridge


def _caller(raw: Request, admin: bool = False) -> Caller | dict:
    """Who is calling (AuthError as an error reply). `admin`: the route needs the admin
    token once the server has tenants or an admin token."""
    tenancy: Tenancy = raw.app.state.rkv_tenancy
    try:
        caller = tenancy.caller(raw.headers.get("authorization"))
        if admin and (tenancy.enabled or tenancy.admin_token is not None):
            tenancy.admin(caller)
    except AuthError as exc:
        return _error(exc.status, _AUTH_TYPES[exc.status], str(exc))
    return caller


async def _parse(raw: Request, model: type[BaseModel]) -> BaseModel | dict:
    body = await raw.body()
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        return _validation_error(model.__name__, exc)


def build_router() -> APIRouter:
    router = APIRouter()

    @router.get("/v1/kv/info")
    async def kv_info(raw: Request):
        caller = _caller(raw)
        if isinstance(caller, dict):
            return _respond(caller)
        answer = await _bridge(raw).call("info", caller=caller)
        if answer["status"] == 200:
            answer["body"]["tenancy"] = raw.app.state.rkv_tenancy.enabled
        return _respond(answer)

    @router.post("/v1/kv/claims")
    async def kv_create_claim(raw: Request):
        caller = _caller(raw)
        if isinstance(caller, dict):
            return _respond(caller)
        req = await _parse_claim(raw)
        if isinstance(req, dict):
            return _respond(req)
        if caller.tenant is not None and req.tenant not in (None, caller.tenant):
            return _respond(_error(403, "forbidden", f"tenant {req.tenant!r} is not the tenant of this token"))
        bridge = _bridge(raw)
        return _respond(await bridge.call("claim", req.model_dump(mode="json"),
                                          timeout=bridge.config.materialize_timeout_s, caller=caller))

    @router.get("/v1/kv/claims")
    async def kv_list_claims(raw: Request):
        caller = _caller(raw)
        if isinstance(caller, dict):
            return _respond(caller)
        return _respond(await _bridge(raw).call("list", caller=caller))

    @router.get("/v1/kv/claims/{claim_id}")
    async def kv_get_claim(claim_id: str, raw: Request):
        caller = _caller(raw)
        if isinstance(caller, dict):
            return _respond(caller)
        return _respond(await _bridge(raw).call("get", {"claim_id": claim_id}, caller=caller))

    @router.delete("/v1/kv/claims/{claim_id}")
    async def kv_release_claim(claim_id: str, raw: Request):
        caller = _caller(raw)
        if isinstance(caller, dict):
            return _respond(caller)
        return _respond(await _bridge(raw).call("release", {"claim_id": claim_id}, caller=caller))

    @router.get("/v1/kv/events")
    async def kv_events(raw: Request):
        caller = _caller(raw)
        if isinstance(caller, dict):
            return _respond(caller)
        query = {}
        for name, default, least, most in (("after", 0, 0, None), ("limit", EVENT_PAGE_LIMIT, 1, EVENT_PAGE_LIMIT)):
            try:
                query[name] = int(raw.query_params.get(name, str(default)))
            except ValueError:
                query[name] = None
            if query[name] is None or query[name] < least or (most is not None and query[name] > most):
                bounds = f"an integer >= {least}" + (f" and <= {most}" if most is not None else "")
                return _respond(_error(422, "invalid_request", f"{name}: must be {bounds}",
                                       fields=[{"loc": ["query", name], "msg": f"must be {bounds}"}]))
        return _respond(await _bridge(raw).call("events", query, caller=caller))

    @router.get("/v1/kv/pool")
    async def kv_pool(raw: Request):
        caller = _caller(raw)
        if isinstance(caller, dict):
            return _respond(caller)
        return _respond(await _bridge(raw).call("pool", caller=caller))

    @router.post("/v1/kv/reset")
    async def kv_reset(raw: Request):
        caller = _caller(raw, admin=True)
        if isinstance(caller, dict):
            return _respond(caller)
        return _respond(await _bridge(raw).call("reset", caller=caller))

    @router.post("/v1/kv/faults")
    async def kv_faults(raw: Request):
        caller = _caller(raw, admin=True)
        if isinstance(caller, dict):
            return _respond(caller)
        req = await _parse(raw, FaultRequest)
        if isinstance(req, dict):
            return _respond(req)
        return _respond(await _bridge(raw).call("fault", req.model_dump(mode="json"), caller=caller))

    @router.post("/v1/completions")
    async def completions(raw: Request):
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        handler = getattr(raw.app.state, "openai_serving_completion", None)
        if handler is None:
            return _respond(_error(501, "unsupported", "this model does not serve completions"))
        return await _generate(raw, CompletionRequest, handler, "create_completion")

    @router.post("/v1/chat/completions")
    async def chat_completions(raw: Request):
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        handler = getattr(raw.app.state, "openai_serving_chat", None)
        unavailable = chat.chat_unavailable(handler)
        if unavailable is not None:
            return _respond(unavailable)
        return await _generate(raw, ChatCompletionRequest, handler, "create_chat_completion")

    return router


async def _json_object(raw: Request, empty: dict | None = None) -> dict:
    """The request body as a JSON object (`empty` if there is none), or an error reply."""
    if empty is not None and not await raw.body():
        return {"status": 200, "body": dict(empty)}
    try:
        body = await raw.json()
    except ValueError:
        return _error(422, "invalid_request", "the body is not JSON")
    if not isinstance(body, dict):
        return _error(422, "invalid_request", "the body must be a JSON object")
    return {"status": 200, "body": body}


async def _parse_claim(raw: Request) -> ClaimRequest | dict:
    """A claim request from token ids, or from chat messages rendered by the model's chat
    template (chat.py); an error reply otherwise."""
    got = await _json_object(raw, empty={})
    if got["status"] != 200:
        return got
    body, error = await chat.claim_body(getattr(raw.app.state, "openai_serving_chat", None), got["body"])
    if error is not None:
        return error
    try:
        return ClaimRequest.model_validate(body)
    except ValidationError as exc:
        return _validation_error(ClaimRequest.__name__, exc)


async def _generate(raw: Request, request_model: type, handler: Any, method: str):
    """A completion or chat completion through vLLM's serving object, with the contract's
    fields around it (see the module docstring)."""
    caller = _caller(raw)
    if isinstance(caller, dict):
        return _respond(caller)
    got = await _json_object(raw)
    if got["status"] != 200:
        return _respond(got)
    body = got["body"]
    bridge = _bridge(raw)
    claim_id = body.pop("claim_id", None)
    request_id = str(body.get("request_id") or f"rkv-{uuid.uuid4().hex[:16]}")
    body["request_id"] = request_id
    if claim_id is not None:
        found = await bridge.call("get", {"claim_id": str(claim_id)}, caller=caller)
        if found["status"] != 200:
            return _respond(found)
    xargs = dict(body.get("vllm_xargs") or {})
    xargs["rkv_request_id"] = request_id
    if claim_id is not None:
        xargs["rkv_claim_id"] = str(claim_id)
    if caller.tenant is not None:
        # The tenant's own cache: its name salts every block hash (the client's salt, if
        # any, after it), as claims are salted (api.py), so tenants share no blocks.
        xargs["rkv_tenant"] = caller.tenant
        salt = body.get("cache_salt")
        body["cache_salt"] = caller.tenant if not salt else f"{caller.tenant}:{salt}"
    body["vllm_xargs"] = xargs
    try:
        vreq = request_model.model_validate(body)
    except ValidationError as exc:
        return _respond(_validation_error(request_model.__name__, exc))

    tap = None
    if getattr(vreq, "stream", False):
        handler, tap = streaming.tapped(handler)
    try:
        result = await getattr(handler, method)(vreq, raw)
    except Exception as exc:  # noqa: BLE001 - what vLLM's own exception handler would answer
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        result = create_error_response(exc)
    if _is_error(result):
        return _vllm_error(result, request_id)
    if tap is not None and not isinstance(result, BaseModel):
        return await _stream(result, tap, request_id)
    return _answer(result.model_dump(), request_id)


def _is_error(result: Any) -> bool:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    return isinstance(result, ErrorResponse)


def _vllm_error(result: Any, request_id: str) -> JSONResponse:
    err = result.error
    if err.code == 400 and "maximum context length" in err.message.lower():
        kind = "capacity"
    elif err.code == 501:
        kind = "unsupported"
    elif err.code >= 500:
        kind = "internal"
    else:
        kind = "invalid_request"
    return JSONResponse({"error": {"type": kind, "message": err.message, "reason": err.type,
                                   "request_id": request_id}}, status_code=err.code)


def _answer(data: dict, request_id: str) -> JSONResponse:
    """vLLM's whole answer plus the `rkv` record, or 409 for a refused request."""
    params = data.get("kv_transfer_params")
    outcome = params.pop("rkv", None) if isinstance(params, dict) else None
    if outcome and outcome.get("refused"):
        return JSONResponse({"error": outcome["refused"]}, status_code=409)
    data["kv_transfer_params"] = params or None
    data["rkv"] = streaming.record(outcome, request_id)
    for choice in data.get("choices") or []:
        if "text" in choice and choice["text"] is None:  # completions without a tokenizer
            choice["text"] = ""
    return JSONResponse(data)


async def _stream(events: Any, tap: streaming.OutcomeTap, request_id: str):
    """A refusal before the first token is a 409; anything else is vLLM's stream with
    the `rkv` record on its last data event (streaming.py)."""
    first = await streaming.first_event(events)
    if tap.refused:
        await events.aclose()
        return JSONResponse({"error": tap.refused}, status_code=409)
    return StreamingResponse(content=streaming.events_with_record(first, events, tap, request_id),
                             media_type="text/event-stream")


class RkvEndpointPlugin:
    """The `vllm.endpoint_plugins` factory (a zero-argument class, as vLLM expects)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        config = AdapterConfig.from_additional_config(getattr(args, "additional_config", None))
        state.rkv_bridge = Bridge(engine_client, config)
        state.rkv_tenancy = Tenancy.from_env()  # ValueError on a malformed RKV_TOKENS: no start
