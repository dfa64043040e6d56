"""Chat messages on the claims adapter: claims made from messages, and the tokenizer check.

A claim is a prefix of token ids, and chat clients hold messages, not ids. So the adapter
accepts `messages` in `POST /v1/kv/claims` (instead of `prompt_token_ids`) and renders them
with vLLM's own chat renderer, the one `/v1/chat/completions` uses (`OpenAIServingChat.
render_chat_request`: the model's chat template, then its tokenizer). The claimed prefix is
therefore exactly what a later chat request over the same messages starts with.

Messages are rendered *without* the generation prompt by default: a claim covers the
conversation so far, and the next turn appends to it (an assistant answer, the next user
message, and only then the generation prompt). `add_generation_prompt: true` renders the
prompt as a request would.

Everything here runs in the API server process and needs a tokenizer; a server started
without one (`--skip-tokenizer-init`) answers chat and message claims with 400 and says so,
instead of vLLM's assertion error (HTTP 500).
"""

from __future__ import annotations

from typing import Any

MESSAGE_FIELDS = ("messages", "add_generation_prompt", "chat_template_kwargs")

NO_TOKENIZER = (
    "this server has no tokenizer (it was started with --skip-tokenizer-init), so it cannot "
    "render chat messages; send token ids to /v1/completions and claims as prompt_token_ids, "
    "or start the server with a tokenizer"
)


def _error(status: int, type_: str, message: str, **extra: Any) -> dict:
    return {"status": status, "body": {"error": {"type": type_, "message": message, **extra}}}


def chat_unavailable(handler: Any) -> dict | None:
    """Why this server cannot serve chat (an error reply), or None if it can."""
    if handler is None:
        return _error(501, "unsupported", "this model does not serve chat completions")
    renderer = getattr(handler, "renderer", None)
    if getattr(renderer, "tokenizer", None) is None:
        return _error(400, "invalid_request", NO_TOKENIZER, reason="no_tokenizer")
    return None


async def render_messages(handler: Any, body: dict) -> list[int] | dict:
    """The token ids of `body["messages"]` as `/v1/chat/completions` would render them,
    or an error reply (400 without a tokenizer, 422 for messages vLLM rejects)."""
    from pydantic import ValidationError
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    unavailable = chat_unavailable(handler)
    if unavailable is not None:
        return unavailable
    try:
        request = ChatCompletionRequest.model_validate({
            "messages": body["messages"],
            "add_generation_prompt": bool(body.get("add_generation_prompt", False)),
            "chat_template_kwargs": body.get("chat_template_kwargs"),
        })
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(map(str, first["loc"]))
        return _error(422, "invalid_request", f"messages: {where}: {first['msg']}",
                      fields=[{"loc": ["messages", *first["loc"]], "msg": first["msg"]}])
    rendered = await handler.render_chat_request(request)
    if isinstance(rendered, ErrorResponse):
        return _error(422, "invalid_request", f"messages: {rendered.error.message}",
                      fields=[{"loc": ["messages"], "msg": rendered.error.message}])
    _, engine_inputs = rendered
    return list(handler._extract_prompt_components(engine_inputs[0]).token_ids)


async def claim_body(handler: Any, body: dict) -> tuple[dict | None, dict | None]:
    """(the claim body with `messages` turned into `prompt_token_ids`, the contract's form,
    None), or (None, an error reply). A body without `messages` comes back as it is."""
    if "messages" not in body:
        extra = [k for k in MESSAGE_FIELDS if k in body]
        if extra:
            return None, _error(422, "invalid_request", f"{extra[0]}: only allowed with messages",
                                fields=[{"loc": [extra[0]], "msg": "only allowed with messages"}])
        return body, None
    if "prompt_token_ids" in body:
        return None, _error(422, "invalid_request", "give either messages or prompt_token_ids, not both",
                            fields=[{"loc": ["messages"], "msg": "not with prompt_token_ids"}])
    tokens = await render_messages(handler, body)
    if isinstance(tokens, dict):
        return None, tokens
    rest = {k: v for k, v in body.items() if k not in MESSAGE_FIELDS}
    return {**rest, "prompt_token_ids": tokens}, None
