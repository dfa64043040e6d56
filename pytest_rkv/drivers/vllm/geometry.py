"""The pool the probes are written for, and the check that vLLM built exactly that pool.

Every litmus case is arithmetic on an 80-block pool (60 resident + 70 active > 80). A
server that silently built another pool (a different block size, an ignored override,
prefix caching off) would make passes and misses meaningless, so the driver refuses to
run on it (`GeometryMismatch`) instead of producing misleading evidence.

vLLM reserves block 0 as its null block, so 80 usable blocks = `--num-gpu-blocks-override 81`.
Two independent statements of vLLM are read:

* `/metrics` `vllm:cache_config_info{num_gpu_blocks=..., block_size=..., enable_prefix_caching=...}`
  (the engine's own CacheConfig after initialisation);
* the engine log, "KV cache size: 2,592 tokens" (blocks x block size).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pytest_rkv.errors import GeometryMismatch

USABLE_BLOCKS = 80
NULL_BLOCKS = 1
NUM_BLOCKS_OVERRIDE = USABLE_BLOCKS + NULL_BLOCKS

_KV_CACHE_SIZE = re.compile(r"KV cache size: ([\d,]+) tokens")
_OVERRIDE = re.compile(r"Overriding num_gpu_blocks=(\d+) with num_gpu_blocks_override=(\d+)")


def max_model_len(block_size: int) -> int:
    """The longest prompt vLLM accepts: the whole usable pool. (vLLM refuses to start if
    max_model_len does not fit in the pool, so it cannot be larger.)"""
    return USABLE_BLOCKS * block_size


@dataclass(frozen=True)
class Geometry:
    block_size: int
    num_blocks: int  # as vLLM counts them, null block included
    source: str

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - NULL_BLOCKS


def log_kv_cache_tokens(log_text: str) -> int | None:
    found = _KV_CACHE_SIZE.findall(log_text)
    return int(found[-1].replace(",", "")) if found else None


def log_override(log_text: str) -> tuple[int, int] | None:
    found = _OVERRIDE.findall(log_text)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def verify(block_size: int, cache_config: dict[str, str] | None, log_text: str) -> Geometry:
    """The verified geometry, or GeometryMismatch naming what differs."""
    problems: list[str] = []
    geometry: Geometry | None = None
    if cache_config is not None:
        try:
            blocks = int(cache_config.get("num_gpu_blocks", ""))
            size = int(cache_config.get("block_size", ""))
        except ValueError:
            problems.append(f"vllm:cache_config_info has no usable num_gpu_blocks/block_size: {cache_config}")
        else:
            geometry = Geometry(size, blocks, "metrics vllm:cache_config_info")
            if size != block_size:
                problems.append(f"block_size is {size}, the driver asked for {block_size}")
            if blocks != NUM_BLOCKS_OVERRIDE:
                problems.append(f"num_gpu_blocks is {blocks} ({blocks - NULL_BLOCKS} usable), "
                                f"the probes need {NUM_BLOCKS_OVERRIDE} ({USABLE_BLOCKS} usable)")
        if cache_config.get("enable_prefix_caching", "True") != "True":
            problems.append("prefix caching is off")
    tokens = log_kv_cache_tokens(log_text)
    if tokens is not None:
        if tokens != NUM_BLOCKS_OVERRIDE * block_size:
            problems.append(f"the engine log reports a KV cache of {tokens} tokens, expected "
                            f"{NUM_BLOCKS_OVERRIDE} x {block_size} = {NUM_BLOCKS_OVERRIDE * block_size}")
        if geometry is None and tokens % block_size == 0:
            geometry = Geometry(block_size, tokens // block_size, "engine log 'KV cache size'")
    if geometry is None and not problems:
        problems.append("vLLM reported its pool neither in /metrics (vllm:cache_config_info) "
                        "nor in its log ('KV cache size: N tokens'); cannot verify it")
    if problems:
        raise GeometryMismatch(
            f"vLLM did not build the {USABLE_BLOCKS}-block pool at block size {block_size} the "
            "probes are written for: " + "; ".join(problems)
        )
    assert geometry is not None
    return geometry
