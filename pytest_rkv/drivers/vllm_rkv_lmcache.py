"""`vllm+rkv+lmcache`: the claims adapter with LMCache as its host tier.

The `vllm+rkv` server (same vLLM, same adapter) started the way `vllm+lmcache` starts it:
LMCache's MP cache server first, vLLM attached to it through `LMCacheMPConnector`, the
attachment verified from LMCache's `/status`, the tier emptied on every reset. Two things
differ from those two backends:

* the adapter runs with `host_tier: true`, so demotable hard claims are demoted to the tier
  under pressure and restored before reuse (docs/vllm-adapter.md, "Demotion");
* LMCache's chunk size is vLLM's block size, so the tier stores every whole block of a
  claim and "all of its blocks are in the tier" is exact (with LMCache's default 256
  tokens, a 60-block claim of 32-token blocks would keep 56).

Depth stays "adapter": what passes is adapter-scoped evidence.
"""

from __future__ import annotations

from typing import ClassVar

from pytest_rkv.contract import Depth
from pytest_rkv.drivers.vllm_lmcache import LmcacheTier
from pytest_rkv.drivers.vllm_rkv import VllmRkvDriver


class VllmRkvLmcacheDriver(LmcacheTier, VllmRkvDriver):
    name: ClassVar[str] = "vllm+rkv+lmcache"
    depth: ClassVar[Depth] = "adapter"
    requires = (*VllmRkvDriver.requires, "lmcache")
    host_tier: ClassVar[bool] = True
    tier_chunk_is_block: ClassVar[bool] = True
