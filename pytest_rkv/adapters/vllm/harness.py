"""vLLM's real scheduler in-process, without a model: for unit tests and benchmarks.

`build_scheduler` constructs vLLM's own `Scheduler` (or `RkvScheduler`) with a KV cache
config that has no tensors, following the recipe in the project's vLLM research notes
(a local `config.json` is the whole model; `HF_HUB_OFFLINE=1`). `StepLoop` stands in for
the engine core: `step()` is `schedule()` -> a fabricated `ModelRunnerOutput` (one sampled
token per scheduled request) -> `update_from_output()`, and it offers the two things the
claim book needs from an `EngineCore` (`add_request`, `request_block_hasher`). So every
block count is vLLM's own allocator at work.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import Future
from pathlib import Path
from typing import Any


def write_model_dir(directory: Path, max_position_embeddings: int = 4096) -> Path:
    from pytest_rkv.drivers.vllm.model import tiny_llama_config

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(tiny_llama_config(max_position_embeddings)))
    return directory


def build_scheduler(model_dir: Path, *, adapter: bool = True, num_blocks: int = 81,
                    block_size: int = 32, policy: str = "priority", rkv: dict | None = None,
                    max_model_len: int | None = None, kv_events: bool = True) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from vllm.config import (
        CacheConfig,
        KVEventsConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import init_none_hash
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
    )
    from vllm.v1.structured_output import StructuredOutputManager

    init_none_hash(sha256)
    kv_cfg = KVCacheConfig(
        num_blocks=num_blocks, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer"], FullAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32))],
    )
    max_len = max_model_len or min(num_blocks - 1, 80) * block_size
    mc = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="float32", max_model_len=max_len)
    sc = SchedulerConfig(max_model_len=max_len, is_encoder_decoder=False,
                         max_num_batched_tokens=max(4096, max_len), policy=policy)
    cc = CacheConfig(block_size=block_size, enable_prefix_caching=True)
    cc.num_gpu_blocks = num_blocks
    vc = VllmConfig(
        model_config=mc, scheduler_config=sc, cache_config=cc,
        kv_events_config=KVEventsConfig(enable_kv_cache_events=kv_events, publisher="null"),
        additional_config={"rkv": {"fault_injection": True, **(rkv or {})}} if adapter else {},
    )
    if adapter:
        from pytest_rkv.adapters.vllm.scheduler import RkvScheduler as cls
    else:
        cls = Scheduler
    return cls(vllm_config=vc, kv_cache_config=kv_cfg, structured_output_manager=StructuredOutputManager(vc),
               block_size=block_size, log_stats=True)


def tokens(tag: str, blocks: int, block_size: int = 32, extra: int = 0) -> list[int]:
    rng = random.Random(tag)
    return [rng.randrange(1, 500) for _ in range(blocks * block_size + extra)]


class StepLoop:
    """The engine-core loop, reduced to what the scheduler sees."""

    def __init__(self, scheduler: Any) -> None:
        from vllm.sampling_params import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.outputs import ModelRunnerOutput
        from vllm.v1.request import Request

        self.scheduler = scheduler
        self.block_size = scheduler.block_size
        self.request_block_hasher = get_request_block_hasher(self.block_size, sha256)
        self._Request, self._SamplingParams, self._MRO = Request, SamplingParams, ModelRunnerOutput
        self.outputs: dict[str, list] = {}

    # what the claim book needs of an EngineCore
    def add_request(self, request: Any) -> None:
        self.scheduler.add_request(request)

    def step(self) -> Any:
        s = self.scheduler
        out = s.schedule()
        ids = list(out.num_scheduled_tokens)
        mro = self._MRO(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                        sampled_token_ids=[[7] for _ in ids], logprobs=None,
                        prompt_logprobs_dict={}, pooler_output=[])
        for eco in s.update_from_output(out, mro).values():
            for o in eco.outputs:
                self.outputs.setdefault(o.request_id, []).append(o)
        return out

    def call(self, op: str, **payload: Any) -> dict:
        """A claim operation as `EngineCore.rkv_call` makes it; a pending claim is
        stepped until its prefill has run."""
        reply = self.scheduler.rkv_handle(op, payload, self)
        for _ in range(10):
            if not isinstance(reply, Future) or reply.done():
                break
            self.step()
        return reply.result() if isinstance(reply, Future) else reply

    def request(self, rid: str, toks: list[int], max_tokens: int = 1, rkv: bool = True,
                tenant: str | None = None) -> Any:
        """A request as the endpoint plugin submits it (a tenant's: salted with its name)."""
        extra = {"rkv_request_id": rid} if rkv else None
        if extra is not None and tenant is not None:
            extra["rkv_tenant"] = tenant
        params = self._SamplingParams(max_tokens=max_tokens, temperature=0.0, extra_args=extra)
        return self._Request(rid, toks, params, None, cache_salt=tenant, block_hasher=self.request_block_hasher)

    def submit(self, rid: str, toks: list[int], max_tokens: int = 1, rkv: bool = True,
               tenant: str | None = None) -> None:
        self.scheduler.add_request(self.request(rid, toks, max_tokens, rkv, tenant))

    def run(self, rid: str, toks: list[int], max_tokens: int = 1, steps: int = 10,
            tenant: str | None = None) -> Any:
        """Submit and step until the request's final output; that output (or None)."""
        self.submit(rid, toks, max_tokens, tenant=tenant)
        for _ in range(steps):
            self.step()
            final = [o for o in self.outputs.get(rid, []) if o.finish_reason is not None]
            if final:
                return final[0]
        return None
