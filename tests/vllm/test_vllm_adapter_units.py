"""The vLLM adapter's decisions, against vLLM's REAL `Scheduler` and `KVCacheManager`.

No model and no server: `pytest_rkv.adapters.vllm.harness` builds the `RkvScheduler`
in-process (a local `config.json`, an 81-block KV cache config with no tensors), and each
engine step is `schedule()` -> a fabricated `ModelRunnerOutput` (one sampled token per
scheduled request) -> `update_from_output()`. Claim operations go through `rkv_handle`,
the method `EngineCore.rkv_call` forwards to. So every block count below is vLLM's own
allocator at work, with the canonical geometry: 80 usable blocks of 32 tokens.

Importing vLLM costs ~7 s once; the tests themselves take milliseconds each.
"""

from __future__ import annotations

import time

import pytest

from tests.runtimes import require_backend  # noqa: E402

pytestmark = require_backend("vllm+rkv")

from pytest_rkv.adapters.vllm import harness  # noqa: E402 (imports vLLM lazily)

BS = 32
USABLE = 80


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return harness.write_model_dir(tmp_path_factory.mktemp("model"))


class Engine(harness.StepLoop):
    def claim(self, tag: str, blocks: int, **kw) -> dict:
        return self.call("claim", prompt_token_ids=tokens(tag, blocks), **kw)

    def events(self) -> list[dict]:
        return self.call("events", after=0)["body"]["events"]

    def pool(self) -> dict:
        return self.call("pool")["body"]

    @property
    def block_pool(self):
        return self.scheduler.kv_cache_manager.block_pool


def make_engine(model_dir, **kw) -> Engine:
    return Engine(harness.build_scheduler(model_dir, **kw))


def tokens(tag: str, blocks: int, extra: int = 0) -> list[int]:
    return harness.tokens(tag, blocks, BS, extra)


def types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


def cached_tokens(output) -> int:
    return output.prefill_stats.num_cached_tokens


@pytest.fixture
def engine(model_dir):
    return make_engine(model_dir)


# -- the canonical probe ---------------------------------------------------------------


def test_canonical_probe_refuses_and_keeps_the_claim(engine):
    claim = engine.claim("resident", 60)
    assert claim["status"] == 201 and claim["body"]["state"] == "resident"
    cid = claim["body"]["claim_id"]
    # the 60 blocks are referenced by the claim: out of vLLM's free queue, unevictable
    pool = engine.block_pool
    assert pool.get_num_free_blocks() == USABLE - 60
    assert engine.pool()["claimed_blocks"] == {cid: 60}

    out = engine.run("active", tokens("active", 70))
    refused = out.kv_transfer_params["rkv"]["refused"]
    assert str(out.finish_reason) == "abort" and out.new_token_ids == []
    assert refused["type"] == "active_refusal" and refused["blocking_claims"] == [cid]
    assert (refused["needed_blocks"], refused["free_blocks"], refused["evictable_blocks"]) == (70, 20, 0)
    assert refused["claimed_blocks"] == {cid: 60}
    assert "active" not in engine.scheduler.requests  # finished, not left waiting

    again = engine.run("again", tokens("resident", 60, extra=1))
    assert cached_tokens(again) == 60 * BS, "every claimed block must still hit"
    assert again.kv_transfer_params["rkv"]["reuse"] == [{"claim_id": cid, "tokens": 60 * BS, "restored": False,
                                                          "recomputed_tokens": 0}]
    assert types(engine.events()) == [
        "claim.accepted", "claim.materialized", "request.refused", "claim.reused", "request.completed",
    ]
    seqs = [e["seq"] for e in engine.events()]
    assert seqs == sorted(set(seqs))
    whole = engine.run("whole", tokens("resident", 60))  # the last-block rule: 59 served, 1 recomputed
    assert cached_tokens(whole) == 59 * BS
    assert whole.kv_transfer_params["rkv"]["reuse"] == [{"claim_id": cid, "tokens": 59 * BS, "restored": False,
                                                          "recomputed_tokens": BS}]


def test_without_a_claim_vllm_evicts_the_resident_and_the_adapter_says_who(engine):
    """The failure mode the contract exists for, reproduced on vLLM's own allocator, and
    the adapter's attribution of it (a blocks.evicted event naming the request)."""
    engine.run("resident", tokens("resident", 60))
    active = engine.run("active", tokens("active", 70))
    assert active.finish_reason is not None and str(active.finish_reason) == "length"
    evicted = [e for e in engine.events() if e["type"] == "blocks.evicted"]
    assert [(e["request_id"], e["blocks"]) for e in evicted] == [("active", 50)]
    again = engine.run("again", tokens("resident", 60, extra=1))
    assert cached_tokens(again) == 10 * BS  # 50 of 60 blocks lost, tail first


def test_a_request_that_only_needs_running_requests_to_finish_waits(engine):
    """Refusal is for requests hard claims make impossible, not for ordinary queueing."""
    cid = engine.claim("hard", 40)["body"]["claim_id"]
    engine.submit("long", tokens("long", 30), max_tokens=20)  # holds 30-31 blocks for 20 steps
    engine.step()
    engine.submit("fits-later", tokens("fits-later", 20))  # 20 <= 80 - 40: must wait, not fail
    engine.submit("never-fits", tokens("never-fits", 50))  # 50 > 80 - 40: refuse
    for _ in range(3):
        engine.step()
    assert "fits-later" in engine.scheduler.requests and not engine.outputs.get("fits-later")
    for _ in range(30):
        engine.step()
    done = [o for o in engine.outputs["fits-later"] if o.finish_reason is not None]
    assert done and str(done[0].finish_reason) == "length", "it ran once the long request finished"
    never = [o for o in engine.outputs["never-fits"] if o.finish_reason is not None]
    assert never[0].kv_transfer_params["rkv"]["refused"]["blocking_claims"] == [cid]


def test_a_hit_on_the_claim_itself_is_not_counted_against_the_request(engine):
    cid = engine.claim("base", 60)["body"]["claim_id"]
    out = engine.run("extends", tokens("base", 60) + tokens("tail", 15))  # 75 blocks, 60 cached
    assert str(out.finish_reason) == "length", "needs only 15 new blocks; 20 are free"
    assert out.kv_transfer_params["rkv"]["reuse"][0]["claim_id"] == cid


def test_every_hard_blocker_is_named(engine):
    a = engine.claim("a", 30)["body"]["claim_id"]
    b = engine.claim("b", 30)["body"]["claim_id"]
    out = engine.run("big", tokens("big", 30))
    refused = out.kv_transfer_params["rkv"]["refused"]
    assert refused["blocking_claims"] == sorted([a, b])
    assert refused["claimed_blocks"] == {a: 30, b: 30}


# -- soft claims -------------------------------------------------------------------------


def test_soft_claim_outlives_unclaimed_cache(engine):
    engine.run("plain", tokens("plain", 20))
    soft = engine.claim("soft", 40, strength="soft")["body"]["claim_id"]
    out = engine.run("active", tokens("active", 30))
    assert str(out.finish_reason) == "length"
    assert "claim.harmed" not in types(engine.events())
    assert engine.call("get", claim_id=soft)["body"]["resident_blocks"] == 40
    assert cached_tokens(engine.run("again", tokens("soft", 40, extra=1))) == 40 * BS


def test_soft_claim_loss_is_one_attributed_harm_event(engine):
    soft = engine.claim("soft", 60, strength="soft")["body"]["claim_id"]
    out = engine.run("active", tokens("active", 70))
    assert str(out.finish_reason) == "length", "a soft claim never blocks an active request"
    harmed = [e for e in engine.events() if e["type"] == "claim.harmed"]
    assert [(e["claim_id"], e["request_id"], e["blocks"]) for e in harmed] == [(soft, "active", 50)]
    assert len(harmed[0]["block_hashes"]) == 50
    claim = engine.call("get", claim_id=soft)["body"]
    assert claim["state"] == "harmed" and claim["resident_blocks"] == 0
    assert engine.pool()["claimed_blocks"] == {}


# -- claim-time decisions ----------------------------------------------------------------


def test_over_budget_claim_is_refused_whole(engine):
    reply = engine.claim("too-big", 65)
    assert reply["status"] == 409 and reply["body"]["error"]["type"] == "no_admit"
    assert "budget" in reply["body"]["error"]["reason"]
    assert types(engine.events()) == ["claim.refused"]
    assert engine.block_pool.get_num_free_blocks() == USABLE
    assert engine.scheduler.requests == {}, "no prefill was started for a refused claim"


def test_claim_shorter_than_a_block_is_invalid(engine):
    reply = engine.call("claim", prompt_token_ids=tokens("short", 0, extra=BS - 1))
    assert reply["status"] == 422


def test_claim_covers_exactly_its_full_blocks(engine):
    body = engine.call("claim", prompt_token_ids=tokens("pred", 20, extra=7))["body"]
    assert (body["blocks"], body["tokens"], body["resident_blocks"]) == (20, 20 * BS, 20)
    from pytest_rkv.drivers.vllm.hashing import block_hash_strings

    assert body["prefix_hash"] == block_hash_strings(tokens("pred", 20), BS)[-1], (
        "prefix_hash must be vLLM's own hash of the last claimed block, as its KV events print it"
    )


def test_injected_materialization_failure_is_claim_scoped(engine):
    assert engine.call("fault", kind="fail_next_materialization")["status"] == 200
    body = engine.claim("doomed", 20)["body"]
    assert body["state"] == "failed" and body["reason"] and body["resident_blocks"] == 0
    assert types(engine.events()) == ["claim.accepted", "claim.materialization_failed"]
    again = engine.run("again", tokens("doomed", 20, extra=1))
    assert "rkv" not in (again.kv_transfer_params or {}), "a failed claim is never reused"


def test_restore_faults_are_declined_without_a_host_tier(engine):
    reply = engine.call("fault", kind="fail_next_restore")
    assert reply["status"] == 501
    assert engine.call("info")["body"]["demotion"] is False


# -- release, expiry, reset --------------------------------------------------------------


def test_release_unpins_at_once(engine):
    cid = engine.claim("released", 60)["body"]["claim_id"]
    assert engine.call("release", claim_id=cid)["body"]["state"] == "released"
    assert engine.block_pool.get_num_free_blocks() == USABLE  # cached again, evictable
    assert str(engine.run("active", tokens("active", 70)).finish_reason) == "length"


def test_expiry_unpins(engine):
    cid = engine.claim("ttl", 60, ttl_s=0.05)["body"]["claim_id"]
    time.sleep(0.1)
    assert str(engine.run("active", tokens("active", 70)).finish_reason) == "length"
    assert engine.call("get", claim_id=cid)["body"]["state"] == "expired"
    expired = [e for e in engine.events() if e["type"] == "claim.expired"]
    assert [e["claim_id"] for e in expired] == [cid]


def test_vllm_cache_reset_cannot_drop_claims_but_the_rkv_reset_can(engine):
    engine.claim("kept", 10)
    assert engine.scheduler.reset_prefix_cache() is False  # vLLM's own reset sees pinned blocks
    pool = engine.call("reset")["body"]
    assert (pool["free_blocks"], pool["claimed_blocks"]) == (USABLE, {})
    assert engine.events() == []


# -- cost ------------------------------------------------------------------------------


class CountingList(list):
    iterations = 0

    def __iter__(self):
        CountingList.iterations += 1
        return super().__iter__()

    def __getitem__(self, index):
        if isinstance(index, slice):
            CountingList.iterations += 1
        return super().__getitem__(index)


def test_steps_never_walk_the_block_pool(model_dir):
    """The per-step bookkeeping is O(claims touched): with 100 claims alive, admitting,
    reusing and finishing requests never iterates the pool's block list (only the pool
    and refusal *answers* do)."""
    engine = make_engine(model_dir, num_blocks=2001, rkv={"claim_budget_blocks": 1000})
    for i in range(100):
        assert engine.claim(f"c{i}", 2)["body"]["state"] == "resident"
    pool = engine.block_pool
    pool.blocks = CountingList(pool.blocks)
    CountingList.iterations = 0
    for i in range(20):
        engine.run(f"r{i}", tokens(f"c{i}", 2, extra=1))
        engine.run(f"n{i}", tokens(f"n{i}", 5))
    assert CountingList.iterations == 0
    assert len([e for e in engine.events() if e["type"] == "claim.reused"]) == 20


def test_without_claims_the_hooks_are_pass_through(engine, monkeypatch):
    """No claim and no RKV request: the allocate wrapper goes straight to vLLM."""
    calls = []
    monkeypatch.setattr(engine.scheduler.rkv.admission, "allocate", lambda *a, **k: calls.append(a))
    engine.submit("plain", tokens("p", 3), rkv=False)
    engine.step()
    assert calls == [] and "plain" in engine.outputs


def test_the_engine_hook_reaches_the_scheduler(engine):
    from vllm.v1.engine.core import EngineCore

    class Core:  # just enough of an EngineCore for the unbound method
        scheduler = engine.scheduler

    assert EngineCore.rkv_call(Core(), "info")["body"]["total_blocks"] == USABLE


# -- more decisions --------------------------------------------------------------------


def test_fcfs_policy_refuses_the_same_way(model_dir):
    engine = make_engine(model_dir, policy="fcfs")
    cid = engine.claim("resident", 60)["body"]["claim_id"]
    out = engine.run("active", tokens("active", 70))
    assert out.kv_transfer_params["rkv"]["refused"]["blocking_claims"] == [cid]


def test_nested_claims_are_each_attributed_their_shared_tokens(engine):
    short = engine.claim("nest", 10)["body"]["claim_id"]
    long = engine.call("claim", prompt_token_ids=tokens("nest", 20))["body"]["claim_id"]
    out = engine.run("again", tokens("nest", 20, extra=1))
    reuse = {r["claim_id"]: r["tokens"] for r in out.kv_transfer_params["rkv"]["reuse"]}
    assert reuse == {short: 10 * BS, long: 20 * BS}


def test_a_claim_waits_for_running_requests_rather_than_being_refused(engine):
    """Not blocked by any hard claim, only by a running request: the claim is accepted and
    materializes once the request has finished (vLLM's ordinary queueing)."""
    engine.submit("long", tokens("long", 70), max_tokens=4)
    engine.step()
    pending = engine.scheduler.rkv_handle("claim", {"prompt_token_ids": tokens("later", 20)}, engine)
    engine.step()
    assert not pending.done()
    for _ in range(8):
        engine.step()
    assert pending.done() and pending.result()["body"]["state"] == "resident"


def test_a_second_claim_on_a_resident_prefix_stacks_its_pins(engine):
    a = engine.claim("same", 10)["body"]["claim_id"]
    b = engine.claim("same", 10)["body"]["claim_id"]
    engine.call("release", claim_id=a)
    assert engine.pool()["claimed_blocks"] == {b: 10}
    assert cached_tokens(engine.run("again", tokens("same", 10, extra=1))) == 10 * BS


def test_unknown_operation_and_claim(engine):
    assert engine.call("nonsense")["status"] == 404
    assert engine.call("get", claim_id="claim-404")["status"] == 404
    assert engine.call("release", claim_id="claim-404")["status"] == 404


def test_adapter_config_rejects_unknown_keys():
    from pytest_rkv.adapters.vllm.config import AdapterConfig

    assert AdapterConfig.from_additional_config({}).budget_for(80) == 64
    assert AdapterConfig.from_additional_config('{"rkv": {"claim_budget_blocks": 10}}').budget_for(80) == 10
    with pytest.raises(ValueError, match="claim_budgt"):
        AdapterConfig.from_additional_config({"rkv": {"claim_budgt": 1}})


def test_driver_adds_the_plugin_to_the_vllm_allowlist():
    from pytest_rkv.drivers.vllm_rkv import (
        adapter_server_args,
        endpoint_plugin_problem,
        plugins_env,
    )

    assert plugins_env(None) == "rkv" and plugins_env("a,b") == "a,b,rkv" and plugins_env("rkv") == "rkv"
    args = adapter_server_args()
    assert args[:2] == ("--scheduler-cls", "pytest_rkv.adapters.vllm.scheduler.RkvScheduler")
    assert endpoint_plugin_problem() is None, "the rkv endpoint plugin entry point is not installed"


def test_event_pages_keep_to_their_limit(engine):
    engine.claim("paged", 3)
    engine.claim("paged-too", 3)
    trace = [e["seq"] for e in engine.events()]
    assert len(trace) >= 3, trace
    first = engine.call("events", after=0, limit=2)["body"]
    rest = engine.call("events", after=first["last_seq"], limit=1000)["body"]
    empty = engine.call("events", after=trace[-1], limit=2)["body"]
    assert [e["seq"] for e in first["events"]] == trace[:2] and first["more"] is True
    assert [e["seq"] for e in rest["events"]] == trace[2:] and rest["more"] is False
    assert first["oldest_seq"] == trace[0] and rest["last_seq"] == trace[-1]
    assert (empty["events"], empty["more"], empty["last_seq"]) == ([], False, trace[-1])


# -- tenants (the endpoint plugin passes the caller's tenant as `_tenant`) ---------------


def test_a_tenant_sees_only_its_own_claims_events_and_budget(model_dir):
    engine = make_engine(model_dir, rkv={"tenant_budget_blocks": 30})
    mine = engine.call("claim", prompt_token_ids=tokens("tenant-a", 10), _tenant="a")["body"]
    cid = mine["claim_id"]
    assert (mine["tenant"], mine["state"]) == ("a", "resident")
    assert engine.call("get", claim_id=cid, _tenant="b")["status"] == 404
    assert engine.call("release", claim_id=cid, _tenant="b")["status"] == 404
    assert engine.call("list", _tenant="b")["body"]["claims"] == []
    theirs_pool = engine.call("pool", _tenant="b")["body"]
    assert theirs_pool["claimed_blocks"] == {} and theirs_pool["tenant_budget_blocks"] == 30
    assert engine.call("events", after=0, _tenant="b")["body"]["events"] == []
    assert [e["claim_id"] for e in engine.call("events", after=0, _tenant="a")["body"]["events"]] == [cid, cid]
    over = engine.call("claim", prompt_token_ids=tokens("tenant-a-more", 21), _tenant="a")
    assert over["status"] == 409 and over["body"]["error"]["reason"].startswith("tenant claim budget: tenant a holds 10")
    assert engine.call("get", claim_id=cid, _tenant="a")["body"]["state"] == "resident"


def test_another_tenant_s_blocking_claim_is_counted_not_named(model_dir):
    engine = make_engine(model_dir)
    cid = engine.call("claim", prompt_token_ids=tokens("resident", 60), _tenant="a")["body"]["claim_id"]
    out = engine.run("theirs", tokens("active", 70), tenant="b")
    refusal = out.kv_transfer_params["rkv"]["refused"]
    assert (refusal["blocking_claims"], refusal["claimed_blocks"]) == ([], {"(another tenant)": 60})
    assert cid not in refusal["message"]
    seen = engine.call("events", after=0, _tenant="b")["body"]["events"]
    assert [(e["type"], e["blocking_claims"]) for e in seen] == [("request.refused", [])]


def test_two_tenants_with_one_prompt_share_no_block(model_dir):
    engine = make_engine(model_dir)
    engine.call("claim", prompt_token_ids=tokens("same", 10), _tenant="a")
    out = engine.run("b-same", tokens("same", 10, 1), tenant="b")
    assert cached_tokens(out) == 0 and out.kv_transfer_params is None  # no reuse record: nothing reused
    again = engine.run("a-same", tokens("same", 10, 1), tenant="a")
    assert [r["tokens"] for r in again.kv_transfer_params["rkv"]["reuse"]] == [10 * BS]


def test_a_named_worker_names_itself_in_ids_claims_reuse_and_events(model_dir):
    """In a routed deployment (`dynamo+rkv`) each engine is told its worker name: ids are
    then unique across workers, and everything a claim produces says where it lives."""
    engine = make_engine(model_dir, rkv={"worker": "w1"})
    claim = engine.call("claim", prompt_token_ids=tokens("named", 10))["body"]
    assert claim["claim_id"].startswith("w1-claim-") and claim["worker"] == "w1"
    out = engine.run("named-again", tokens("named", 10, 1))
    assert [(r["claim_id"], r["worker"]) for r in out.kv_transfer_params["rkv"]["reuse"]] == [(claim["claim_id"], "w1")]
    events = engine.call("events", after=0)["body"]["events"]
    assert events and {e["worker"] for e in events} == {"w1"}
    assert events[0]["request_id"].startswith("w1-claimreq-")


def test_an_unnamed_engine_adds_no_worker_field(model_dir):
    engine = make_engine(model_dir)
    claim = engine.call("claim", prompt_token_ids=tokens("unnamed", 10))["body"]
    out = engine.run("unnamed-again", tokens("unnamed", 10, 1))
    assert claim["worker"] is None and not claim["claim_id"].startswith("w")
    assert all("worker" not in r for r in out.kv_transfer_params["rkv"]["reuse"])
    assert all("worker" not in e for e in engine.call("events", after=0)["body"]["events"])
