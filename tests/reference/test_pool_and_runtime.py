"""The reference pool and runtime as units: block hashes, workloads, pool accounting."""

from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_rkv.contract import (
    ClaimRequest,
    CompletionRequest,
)
from pytest_rkv.reference.pool import block_hashes
from pytest_rkv.reference.runtime import ApiError, FakeClock, MicroRuntime
from pytest_rkv.trace import order_problems
from pytest_rkv.workload import prompt_tokens



# -- the reference pool and runtime ---------------------------------------------------

def test_block_hashes_chain_and_ignore_the_partial_tail():
    a = block_hashes(list(range(40)), 16)
    b = block_hashes(list(range(32)) + [99] * 8, 16)
    assert len(a) == 2 and a == b
    assert block_hashes([7] + list(range(1, 32)), 16)[1] != a[1], "a changed parent changes every later hash"


def test_workload_prompts_are_deterministic_and_tag_distinct():
    assert prompt_tokens("x", 2, 16) == prompt_tokens("x", 2, 16)
    assert prompt_tokens("x", 2, 16)[:16] != prompt_tokens("y", 2, 16)[:16]
    assert len(prompt_tokens("x", 2, 16, extra_tokens=3)) == 35


operations = st.lists(
    st.tuples(
        st.sampled_from(["claim", "soft", "demotable", "run", "release", "wait"]),
        st.integers(min_value=1, max_value=80),
        st.integers(min_value=0, max_value=5),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(operations)
def test_pool_accounting_holds_under_any_operation_sequence(ops):
    clock = FakeClock()
    rt = MicroRuntime(clock=clock)
    ids: list[str] = []
    for op, blocks, tag in ops:
        tokens = prompt_tokens(f"t{tag}", blocks, 16)
        try:
            if op in ("claim", "soft", "demotable"):
                c = rt.create_claim(ClaimRequest(prompt_token_ids=tokens, strength="soft" if op == "soft" else "hard",
                                                 demotable=op == "demotable", ttl_s=5.0))
                ids.append(c.claim_id)
            elif op == "run":
                rt.complete(CompletionRequest(prompt=tokens + [1]))
            elif op == "release" and ids:
                rt.release_claim(ids[blocks % len(ids)])
            else:
                clock.advance(blocks / 10)
        except ApiError as exc:
            assert exc.status in (400, 409)
        pool = rt.pool_state()
        held = {b.block_id for b in rt.pool.blocks if b.hard_holders}
        assert pool.free_blocks + pool.cached_blocks + len(held) + _soft(rt) <= pool.total_blocks
        assert sum(pool.claimed_blocks.values()) <= pool.claim_budget_blocks
        assert order_problems(rt.events().events) == []


def _soft(rt):
    return sum(1 for b in rt.pool.blocks if b.soft_holders and not b.hard_holders)


