"""Streamed completions with claims: the `rkv` record in the stream, refusals as HTTP 409.

vLLM's stream generators drop `kv_transfer_params`, which is where the scheduler puts a
request's outcome (claims.py, `after_update`). So the route serves a stream through a
*copy* of vLLM's serving object whose `engine_client` is an `OutcomeTap`: a proxy that
passes every call through to the real engine client and, on the way back, keeps the
`rkv` outcome of the request's outputs. vLLM's own objects are never modified (the copy
is shallow and per request; everything else it holds is shared).

What the client sees:

* a refusal before the first token: the route reads the stream's first event before it
  answers, so a refused request (it finishes at once, with no token) becomes HTTP 409
  `active_refusal` with the claim book's ErrorResponse, exactly as without streaming;
* otherwise vLLM's stream, unchanged, except that its **last data event** (the `usage`
  chunk when `stream_options.include_usage` is set, else the chunk with `finish_reason`)
  also carries `"rkv": {"request_id", "reuse", "failures"}`, as the non-streamed answer
  does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

DONE = "data: [DONE]"


class OutcomeTap:
    """An engine client that remembers the `rkv` outcome of the requests it generates."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.outcome: dict | None = None

    def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        return self._tap(self._inner.generate(*args, **kwargs))

    async def _tap(self, outputs: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for out in outputs:
            params = getattr(out, "kv_transfer_params", None)
            if isinstance(params, dict) and "rkv" in params:  # on the final output only
                self.outcome = params["rkv"]
            yield out

    @property
    def refused(self) -> dict | None:
        return (self.outcome or {}).get("refused")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def tapped(handler: Any) -> tuple[Any, OutcomeTap]:
    """A per-request copy of a vLLM serving object, generating through an OutcomeTap."""
    tap = OutcomeTap(handler.engine_client)
    mine = copy.copy(handler)
    mine.engine_client = tap
    return mine, tap


def record(outcome: dict | None, request_id: str) -> dict:
    """The response's `rkv` record from the scheduler's outcome (None: nothing happened)."""
    outcome = outcome or {}
    return {"request_id": request_id, "reuse": outcome.get("reuse", []),
            "failures": outcome.get("failures", [])}


def with_record(event: str, rkv: dict) -> str:
    """A `data: {...}` SSE event with the `rkv` record added; other events unchanged."""
    head, sep, rest = event.partition("data: ")
    if head.strip() or not sep:
        return event
    payload, tail = rest.rstrip("\n"), rest[len(rest.rstrip("\n")):]
    try:
        data = json.loads(payload)
    except ValueError:
        return event
    if not isinstance(data, dict):
        return event
    data["rkv"] = rkv
    return f"data: {json.dumps(data, separators=(',', ':'))}{tail or chr(10) * 2}"


async def first_event(stream: AsyncIterator[str]) -> str | None:
    """The stream's first event (None if it is empty). By the time vLLM yields it, the
    request's first output, and with it a refusal's outcome, has reached the tap."""
    async for event in stream:
        return event
    return None


async def events_with_record(first: str | None, stream: AsyncIterator[str], tap: OutcomeTap,
                             request_id: str) -> AsyncIterator[str]:
    """The stream from its first event on, with the `rkv` record on the last data event.

    Each data event is held back until the next one arrives, so the last one before
    `[DONE]` can still be changed; the outcome has reached the tap by then (vLLM yields
    the final chunks after it consumed the request's final output)."""
    held: str | None = None

    async def events() -> AsyncIterator[str]:
        if first is not None:
            yield first
        async for event in stream:
            yield event

    try:
        async for event in events():
            if event.startswith(DONE):
                if held is not None:
                    yield with_record(held, record(tap.outcome, request_id))
                    held = None
                yield event
            elif event.startswith("data: "):
                if held is not None:
                    yield held
                held = event
            else:
                yield event
        if held is not None:  # a stream that ended without [DONE]
            yield with_record(held, record(tap.outcome, request_id))
    finally:
        closer = getattr(stream, "aclose", None)
        if closer is not None:
            await closer()
