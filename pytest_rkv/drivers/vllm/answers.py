"""vLLM's OpenAI answers mapped to the contract, and back (pure: no vLLM, no event decoder).

Kept apart from the driver because other backends whose front end speaks vLLM's answer
shape (Dynamo's frontend over vLLM workers) reuse it without needing the vllm extra."""

from __future__ import annotations

import re

from pytest_rkv.contract import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorBody,
    PromptTokensDetails,
    Usage,
)
from pytest_rkv.errors import HarnessError, ProtocolViolation

_CONTEXT_LENGTH = re.compile(r"maximum context length", re.IGNORECASE)


def completion_body(req: CompletionRequest, served_name: str, priority: int | None = None) -> dict:
    """The vLLM request for a contract completion.

    `temperature` 0 and `ignore_eos` make the output length exactly `max_tokens`: with
    dummy weights the model may emit its EOS token at random, and the probes rely on a
    request holding its blocks for as many decode steps as they asked for."""
    body: dict = {
        "model": req.model or served_name,
        "prompt": list(req.prompt),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    if req.request_id is not None:
        body["request_id"] = req.request_id
    if priority is not None:
        body["priority"] = priority
    return body


def completion_from_vllm(payload: dict) -> Completion:
    usage = payload.get("usage") or {}
    details = usage.get("prompt_tokens_details")
    if not details or details.get("cached_tokens") is None:
        raise HarnessError(
            "vLLM answered without usage.prompt_tokens_details.cached_tokens; the server must "
            "run with --enable-prompt-tokens-details"
        )
    try:
        return Completion(
            id=payload["id"],
            model=payload["model"],
            choices=[
                CompletionChoice(index=c.get("index", 0), text=c.get("text") or "",
                                 token_ids=c.get("token_ids") or [],
                                 finish_reason=c.get("finish_reason") or "length")
                for c in payload["choices"]
            ],
            usage=Usage(
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage.get("completion_tokens") or 0,
                total_tokens=usage["total_tokens"],
                prompt_tokens_details=PromptTokensDetails(cached_tokens=details["cached_tokens"]),
            ),
            rkv=None,
        )
    except (KeyError, TypeError) as exc:
        raise ProtocolViolation(f"vLLM completion lacks {exc}: {str(payload)[:300]}") from None


def error_from_vllm(status: int, payload: dict, request_id: str | None = None) -> ErrorBody:
    """A contract error for a vLLM error answer.

    vLLM's body is `{"error": {"message", "type", "param", "code"}}` (older releases:
    the same keys at top level). A prompt longer than the pool (= max_model_len) is a
    400 "maximum context length" -> `capacity`; everything else -> `invalid_request`.
    vLLM's own error type is kept in `reason`."""
    error = payload.get("error") if isinstance(payload.get("error"), dict) else payload
    message = str(error.get("message") or f"HTTP {status}")
    kind = "capacity" if status == 400 and _CONTEXT_LENGTH.search(message) else "invalid_request"
    vllm_type = error.get("type")
    return ErrorBody(type=kind, message=message, reason=str(vllm_type) if vllm_type else None,
                     request_id=request_id)
