"""`ClaimCore`: the adapter's claim machinery inside vLLM's engine core, in three parts.

* `book.ClaimBook`: the claims, the blocks each pins, the reuse index, the TTL heap and
  the event log (and the contract models every answer is built from);
* `admission.Admission`: the scheduler hooks, where requests are admitted, refused,
  attributed reuse, and claims materialize;
* `api.ClaimApi`: the RKV API v1 operations the endpoint plugin reaches through the engine
  utility call `EngineCore.rkv_call`.

`RkvScheduler` owns one `ClaimCore`; everything runs in the engine thread (scheduler
hooks and utility calls alike), so nothing takes a lock or races vLLM's bookkeeping.

How each part of the contract maps onto vLLM's v1 KV cache is in docs/vllm-adapter.md;
each module's docstring states its invariants.

Cost per scheduler step, with no claims: one dict truthiness test per hook. With claims:
work proportional to the claims and blocks an admission actually touches (the index
lookup, the hit blocks, the soft claims that yield); nothing walks the block pool per step.
Two API answers do walk the pool, once per call: `GET /v1/kv/pool` and the arithmetic of a
refusal (how many blocks are free vs. evictable). See bench/README.md.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from pytest_rkv.adapters.vllm.admission import Admission
from pytest_rkv.adapters.vllm.api import ClaimApi
from pytest_rkv.adapters.vllm.book import ClaimBook, hash_hex  # noqa: F401 (public name)
from pytest_rkv.adapters.vllm.config import AdapterConfig


class ClaimCore:
    """The book, admission and the API of one scheduler, wired together."""

    def __init__(self, scheduler: Any, config: AdapterConfig) -> None:
        self.config = config
        pool = scheduler.kv_cache_manager.block_pool
        self.block_size: int = scheduler.block_size
        self.usable_blocks: int = pool.num_gpu_blocks - 1  # block 0 is vLLM's null block
        self.budget: int = config.budget_for(self.usable_blocks)
        self.unsupported = unsupported_reason(scheduler)
        self.book = ClaimBook(pool, self.block_size, config.max_events, worker=config.worker)
        if config.host_tier and getattr(scheduler, "connector", None) is None:
            raise ValueError("the RKV adapter's host_tier needs a KV connector that stores and loads "
                             "blocks (--kv-transfer-config, e.g. LMCache's LMCacheMPConnector)")
        self.admission = Admission(scheduler, self.book, self.usable_blocks, host_tier=config.host_tier)
        self.api = ClaimApi(scheduler, self.book, self.admission, config, usable_blocks=self.usable_blocks,
                            budget=self.budget, unsupported=self.unsupported)
        self.admission.take_fault = self.api.take_fault

    def handle(self, op: str, payload: dict, engine: Any) -> dict | Future:
        return self.api.handle(op, payload, engine)


def unsupported_reason(scheduler: Any) -> str | None:
    """Why claims cannot work on this engine, or None."""
    groups = len(scheduler.kv_cache_config.kv_cache_groups)
    if groups != 1:
        return f"claims need exactly one KV cache group (full attention); this model has {groups}"
    if not scheduler.kv_cache_manager.enable_caching:
        return "claims need prefix caching (--enable-prefix-caching)"
    return None
