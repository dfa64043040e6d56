"""Lowering probes: does a runtime's nearby feature deliver an obligation?

These run the canonical probe through a feature someone might propose as a lowering
(here: request priority as a hard claim). A pass supports the lowering; a failure is the
evidence the lowering checker turns into *rejected mapping*.
"""

import pytest

from pytest_rkv.contract import CompletionRequest
from pytest_rkv.workload import ACTIVE_BLOCKS, RESIDENT_BLOCKS

FAVOURED, DISFAVOURED = -100, 100  # lower value runs first (vLLM's convention)


@pytest.mark.rkv_lowering("priority-as-hard-claim", "active-refusal")
@pytest.mark.rkv_litmus("active_refusal")
def test_priority_as_hard_claim(rkv):
    def at(priority, tag, blocks, extra=0):
        return rkv.driver.complete_at_priority(
            CompletionRequest(prompt=rkv.tokens(tag, blocks, extra), max_tokens=1), priority)

    resident = at(FAVOURED, "resident", RESIDENT_BLOCKS)
    assert resident.ok, f"the resident request failed: {resident.error}"
    mark = rkv.block_mark()
    active = at(DISFAVOURED, "active", ACTIVE_BLOCKS)
    evicted = rkv.evicted_since(mark)
    again = at(FAVOURED, "resident", RESIDENT_BLOCKS, extra=1)
    surviving = rkv.cached_tokens(again) // rkv.block_size
    rkv.record("active_admitted", active.ok)
    rkv.record("active_error", active.error.model_dump(mode="json") if active.error else None)
    rkv.record("blocks_evicted_by_active", evicted)
    rkv.record("resident_blocks_surviving", surviving)
    assert surviving == RESIDENT_BLOCKS and not active.ok and active.error.blocking_claims, (
        f"lowering contradicted: the favoured resident kept {surviving} of {RESIDENT_BLOCKS} blocks; "
        f"the disfavoured {ACTIVE_BLOCKS}-block request was "
        + ("admitted" if active.ok else f"refused without attribution ({active.error.type})")
        + f"; {evicted} blocks evicted"
    )
