"""Substrates: useful primitives a runtime may have without any claim support.

They are recorded in the row and make a missing obligation an *approximation substrate*
rather than *unknown*; they never count as obligations themselves.
"""

import pytest

from pytest_rkv.contract import EventType
from pytest_rkv.errors import Unsupported
from pytest_rkv.workload import ACTIVE_BLOCKS, POOL_BLOCKS, RESIDENT_BLOCKS


@pytest.mark.rkv_substrate("prefix_reuse")
def test_repeated_prefix_is_served_from_cache(rkv):
    _, first = rkv.run("shared", RESIDENT_BLOCKS)
    _, again = rkv.reuse_query("shared", RESIDENT_BLOCKS)
    rkv.record("cached_tokens_first", rkv.cached_tokens(first))
    rkv.record("cached_tokens_again", rkv.cached_tokens(again))
    assert rkv.cached_tokens(first) == 0, "a fresh prompt cannot have cached tokens"
    assert rkv.cached_tokens(again) == RESIDENT_BLOCKS * rkv.block_size, (
        f"the repeated {RESIDENT_BLOCKS}-block prefix should be served from cache"
    )


@pytest.mark.rkv_substrate("eviction_observable")
def test_pressure_displaces_unclaimed_cache_visibly(rkv):
    timeline = rkv.timeline()
    rkv.run("resident", RESIDENT_BLOCKS)
    timeline.resident_written(f"{RESIDENT_BLOCKS}-block prompt cached (no claim)")
    mark = rkv.block_mark()
    _, active = rkv.run("active", ACTIVE_BLOCKS)
    evicted = rkv.evicted_since(mark)
    timeline.active_ran(f"{ACTIVE_BLOCKS}-block prefill", admitted=active.ok)
    _, again = rkv.reuse_query("resident", RESIDENT_BLOCKS)
    survived = rkv.cached_tokens(again) // rkv.block_size
    timeline.resident_measured("resident re-queried", survived)
    rkv.record("timeline", timeline.steps)
    rkv.record("active_admitted", active.ok)
    rkv.record("resident_blocks_surviving", survived)
    rkv.record("blocks_evicted_by_active", evicted)
    assert active.ok, f"with no claim, the active request must run: {active.error}"
    assert survived < RESIDENT_BLOCKS, "60 + 70 blocks cannot both fit in 80; something was lost"
    assert evicted >= RESIDENT_BLOCKS - survived, (
        f"{RESIDENT_BLOCKS - survived} resident blocks were lost but block events report {evicted} evictions"
    )


@pytest.mark.rkv_substrate("block_events")
def test_block_events_are_published_in_order(rkv):
    mark = rkv.block_mark()
    rkv.run("events", 10)
    events = rkv.driver.block_events(after=mark)
    stored = sum(len(e.block_hashes) for e in events if e.type == EventType.BLOCKS_STORED)
    rkv.record("blocks_stored", stored)
    seqs = [e.seq for e in events]
    assert stored >= 10, f"a 10-block prompt should store at least 10 blocks, events show {stored}"
    assert seqs == sorted(set(seqs)), f"block event seq numbers are not strictly increasing: {seqs}"


def _host_stored(events):
    return sum(len(e.block_hashes) for e in events if e.type == EventType.BLOCKS_STORED and e.tier == "host")


@pytest.mark.rkv_substrate("host_tier")
def test_displaced_prefix_is_served_again_from_a_host_tier(rkv):
    """60 blocks cached, a 70-block intruder: the 80-block device pool can keep at most 10
    of them, so a re-query served more than 10 blocks from cache got them from a tier.
    (A tier may store in chunks of several blocks: its events count hashes, not blocks.)"""
    mark = rkv.block_mark()
    before = rkv.driver.metrics()
    rkv.run("tiered", RESIDENT_BLOCKS)
    _, active = rkv.run("intruder", ACTIVE_BLOCKS)
    _, again = rkv.reuse_query("tiered", RESIDENT_BLOCKS)
    events = rkv.driver.block_events(after=mark)
    after = rkv.driver.metrics()
    host_stored = _host_stored(events)
    device_evicted = sum(len(e.block_hashes) for e in events
                         if e.type == EventType.BLOCKS_EVICTED and e.tier == "device")
    device_room = (POOL_BLOCKS - ACTIVE_BLOCKS) * rkv.block_size
    cached = rkv.cached_tokens(again)
    rkv.record("host_hashes_stored", host_stored)
    rkv.record("device_blocks_evicted", device_evicted)
    rkv.record("cached_tokens_again", cached)
    rkv.record("device_room_tokens", device_room)
    rkv.record("cached_by_source_delta", {k: after[k] - before.get(k, 0.0) for k in after if "by_source" in k})
    if not host_stored:
        raise Unsupported("no block events on a host tier: the backend shows no tier to keep displaced blocks")
    assert active.ok, f"with no claim, the intruder must run: {active.error}"
    assert device_evicted > 0, "the intruder displaced nothing from the device pool; the tier was not exercised"
    assert cached > device_room, (
        f"the re-query got {cached} cached tokens, no more than the {device_room} the device pool could "
        "have kept: nothing was served from the host tier"
    )
