"""`RkvScheduler`: vLLM's own v1 `Scheduler`, plus the claim book, loaded with
`--scheduler-cls pytest_rkv.adapters.vllm.scheduler.RkvScheduler`.

It overrides only public `SchedulerInterface` methods (`add_request`, `schedule`,
`update_from_output`) and wraps one method of the `KVCacheManager` instance it owns
(`allocate_slots`, the single place vLLM decides whether a request's blocks fit). Every
override calls vLLM's implementation; the claim work around it is in `claims.ClaimCore`
(its `admission` for the hooks, its `api` for the utility call).

Importing this module also installs `EngineCore.rkv_call` (see `install_engine_hook`), the
one method through which the API server's endpoint plugin reaches the claim book as an
ordinary engine utility call.
"""

from __future__ import annotations

import functools
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from pytest_rkv.adapters.vllm import ADAPTER_VERSION, ENGINE_METHOD
from pytest_rkv.adapters.vllm.claims import ClaimCore
from pytest_rkv.adapters.vllm.config import AdapterConfig

logger = init_logger(__name__)


def install_engine_hook() -> None:
    """Give vLLM's `EngineCore` one extra utility method, `rkv_call(op, payload)`.

    vLLM runs utility calls (`EngineCoreClient.call_utility_async(name, *args)`) in the
    engine thread between steps, by looking the method up by name on the engine core, so
    the claim operations never race the scheduler, work while the engine is idle, and may
    return a `Future` (a claim resolves when its prefill has run). Nothing existing is
    replaced; calling it twice is harmless."""
    from vllm.v1.engine.core import EngineCore

    if getattr(EngineCore, ENGINE_METHOD, None) is not None:
        return

    def rkv_call(self, op: str, payload: dict | None = None):
        handle = getattr(self.scheduler, "rkv_handle", None)
        if handle is None:
            raise RuntimeError(
                "the RKV adapter is not active in this engine: start vLLM with "
                "--scheduler-cls pytest_rkv.adapters.vllm.scheduler.RkvScheduler"
            )
        return handle(op, payload or {}, self)

    rkv_call.__qualname__ = f"EngineCore.{ENGINE_METHOD}"
    setattr(EngineCore, ENGINE_METHOD, rkv_call)


class RkvScheduler(Scheduler):
    """vLLM's scheduler with Resident KV Claims (RKV API v1 semantics)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        install_engine_hook()
        config = AdapterConfig.from_additional_config(self.vllm_config.additional_config)
        self.rkv = ClaimCore(self, config)
        manager = self.kv_cache_manager
        self._rkv_allocate_slots = manager.allocate_slots
        # An instance attribute on the manager this scheduler owns: vLLM's scheduler calls
        # `self.kv_cache_manager.allocate_slots(...)`, so admission goes through the claims.
        manager.allocate_slots = functools.partial(self._rkv_allocate, manager.allocate_slots)
        if config.host_tier:
            # Same pattern on the KV connector this scheduler owns: vLLM asks it how many
            # tokens it can load for a fresh request; only a claim's restore may load
            # (`Admission.allow_load`), otherwise the answer is "none".
            connector = self.connector
            connector.get_num_new_matched_tokens = functools.partial(
                self._rkv_matched_tokens, connector.get_num_new_matched_tokens)
        logger.info(
            "RKV adapter %s active: %d usable blocks of %d tokens, claim budget %d blocks%s",
            ADAPTER_VERSION, self.rkv.usable_blocks, self.rkv.block_size, self.rkv.budget,
            f" (claims unsupported: {self.rkv.unsupported})" if self.rkv.unsupported else "",
        )

    # -- hooks ---------------------------------------------------------------------------
    def _rkv_allocate(self, orig, request, num_new_tokens, *args, **kwargs):
        admission = self.rkv.admission
        if admission.book.live or admission.refusals:
            return admission.allocate(orig, request, num_new_tokens, args, kwargs)
        if admission.tracked:  # no claims: at most attribute evictions
            return admission.allocate_followed(orig, request, num_new_tokens, args, kwargs)
        return orig(request, num_new_tokens, *args, **kwargs)

    def _rkv_matched_tokens(self, orig, request, num_computed_tokens):
        tokens, load_async = orig(request, num_computed_tokens)
        if tokens and not self.rkv.admission.allow_load(request):
            return 0, False
        return tokens, load_async

    def add_request(self, request) -> None:
        super().add_request(request)
        self.rkv.admission.on_add(request)

    def schedule(self, *args: Any, **kwargs: Any):
        admission = self.rkv.admission
        if admission.book.expiry or admission.tracked:
            admission.before_schedule()
        return super().schedule(*args, **kwargs)

    def update_from_output(self, scheduler_output, model_runner_output):
        admission = self.rkv.admission
        if admission.mat:
            admission.pin_materialized(scheduler_output)
        if admission.storing:
            sent = getattr(model_runner_output.kv_connector_output, "finished_sending", None) \
                if model_runner_output.kv_connector_output is not None else None
            if sent:
                admission.stores_completed(set(sent))
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if admission.engaged:
            admission.after_update(outputs)
        return outputs

    # -- the utility entry (EngineCore.rkv_call) -----------------------------------------
    def rkv_handle(self, op: str, payload: dict, engine: Any):
        return self.rkv.handle(op, payload, engine)


# Installed at import too: vLLM imports the scheduler class in the engine-core process
# before it can receive any utility call.
install_engine_hook()
