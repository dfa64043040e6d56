"""The agent benchmark's pure parts (bench/agentic): generator, schedule, refusal handling,
stream parsing, figures and the KV-event cross-check. No server, no vLLM import."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.agentic import configs, figures  # noqa: E402
from bench.agentic.client import is_refused_stream, read_stream, sse_payloads  # noqa: E402
from bench.agentic.policy import RefusalPolicy, recomputed_tokens  # noqa: E402
from bench.agentic.workload import Params, background_request, generate  # noqa: E402
from pytest_rkv.drivers.vllm.hashing import block_hash_strings  # noqa: E402

# -- generator ---------------------------------------------------------------------------


def test_same_seed_same_workload_and_background():
    assert generate(Params(seed=5)) == generate(Params(seed=5))
    assert background_request(Params(seed=5), 1, 7) == background_request(Params(seed=5), 1, 7)


def test_other_seed_other_workload():
    a, b = generate(Params(seed=5)), generate(Params(seed=6))
    assert a.system != b.system
    assert [s.task for s in a.sessions] != [s.task for s in b.sessions]
    assert background_request(Params(seed=5), 0, 0) != background_request(Params(seed=6), 0, 0)


def test_one_parameter_changes_only_what_it_names():
    """Sessions draw from their own streams: more sessions leave the first ones unchanged."""
    a, b = generate(Params(sessions=9)), generate(Params(sessions=12))
    assert a.sessions == b.sessions[:9]


def test_workload_respects_its_bounds():
    p = Params(seed=3, sessions=40, agents=4)
    w = generate(p)
    assert len(w.system) == p.system_tokens
    assert {s.agent for s in w.sessions} == set(range(4))
    for s in w.sessions:
        assert p.task_tokens_min <= len(s.task) <= p.task_tokens_max
        assert p.turns_min <= len(s.turns) <= p.turns_max
        *tools, last = s.turns
        assert last.tool_result == () and last.pause_s == 0.0
        for t in tools:
            assert p.decode_min <= t.decode_tokens <= p.decode_max
            assert p.tool_result_min <= len(t.tool_result) <= p.tool_result_max
            assert p.pause_min_s <= t.pause_s <= p.pause_max_s
        assert all(1 <= tok < 500 for tok in s.task)
    prompt, max_tokens = background_request(p, 0, 0)
    assert p.background_blocks_min * 32 <= len(prompt) <= p.background_blocks_max * 32 + 31
    assert max_tokens == p.background_max_tokens


@pytest.mark.parametrize("change, words", [
    (dict(turns_min=5, turns_max=2), "turns_min (5) > turns_max (2)"),
    (dict(agents=4, sessions=2), "agents <= sessions"),
    (dict(pause_min_s=-1.0), "pause_min_s must be >= 0"),
])
def test_bad_parameters_are_one_line_errors(change, words):
    with pytest.raises(ValueError, match=None) as info:
        generate(replace(Params(), **change))
    assert words in str(info.value) and "\n" not in str(info.value)


# -- configurations and their order ------------------------------------------------------


def test_schedule_alternates_and_shares_servers():
    known = configs.configurations(ttl_s=5)
    order = configs.ordered(["stock", "rkv-hard-ttl", "rkv-soft"], known)
    plan = configs.schedule(order, repeats=2)
    assert plan == [("vllm", ["stock"]), ("vllm+rkv", ["rkv-hard-ttl", "rkv-soft", "rkv-soft", "rkv-hard-ttl"]),
                    ("vllm", ["stock"])]
    flat = [n for _, names in plan for n in names]
    for name in ("stock", "rkv-hard-ttl", "rkv-soft"):  # every configuration centred on the middle
        positions = [i for i, n in enumerate(flat) if n == name]
        assert sum(positions) / len(positions) == (len(flat) - 1) / 2


def test_pending_and_unknown_configurations_are_named():
    known = configs.configurations(ttl_s=5)
    with pytest.raises(ValueError, match="not available yet.*not wired"):
        configs.ordered(["stock", "lmcache"], known)
    with pytest.raises(ValueError, match="unknown configuration"):
        configs.ordered(["nope"], known)


# -- refusal handling ----------------------------------------------------------------------


def test_refused_claim_backs_off_then_falls_back():
    policy = RefusalPolicy(backoff_s=0.2, claim_retries=2)
    first = policy.after_claim_refused(1, time_left_s=5.0)
    second = policy.after_claim_refused(2, time_left_s=5.0)
    assert (first.action, first.delay_s) == ("retry", 0.2)
    assert (second.action, second.delay_s) == ("retry", 0.4)
    assert policy.after_claim_refused(3, time_left_s=5.0).action == "fallback"


def test_refused_claim_falls_back_when_the_tool_is_about_to_finish():
    assert RefusalPolicy(backoff_s=0.5).after_claim_refused(1, time_left_s=0.3).action == "fallback"


def test_refused_turn_retries_with_growing_backoff_then_fails():
    policy = RefusalPolicy(backoff_s=0.2, backoff_max_s=1.0, turn_retries=4)
    delays = [policy.after_turn_refused(a).delay_s for a in range(1, 5)]
    assert delays == [0.2, 0.4, 0.8, 1.0]
    assert policy.after_turn_refused(5).action == "fail"


def test_refusal_in_a_stream_is_recognised():
    refused = read_stream([{"choices": [{"index": 0, "text": "", "token_ids": [], "finish_reason": "abort"}]},
                           {"choices": [], "usage": {"prompt_tokens": 70, "completion_tokens": 0}}], began=0.0)
    assert is_refused_stream(refused)
    ran = read_stream([{"choices": [{"text": "", "token_ids": [7], "finish_reason": None}]},
                       {"choices": [{"text": "", "token_ids": [8], "finish_reason": "length"}]}], began=0.0)
    assert not is_refused_stream(ran)


def test_stream_parsing_takes_ttft_tokens_and_usage():
    ticks = iter([1.25, 9.0])
    lines = [b": keep-alive", b"data: " + b'{"choices":[{"text":"","token_ids":[]}]}',
             b'data: {"choices":[{"text":"a","token_ids":[5,6]}]}',
             b'data: {"choices":[{"text":"b","token_ids":[7],"finish_reason":"length"}]}',
             b'data: {"choices":[],"usage":{"prompt_tokens":100,"prompt_tokens_details":{"cached_tokens":64}}}',
             b"data: [DONE]", b'data: {"never": "read"}']
    out = read_stream(sse_payloads(lines), began=1.0, clock=lambda: next(ticks))
    assert out.ttft_s == 0.25
    assert out.output_ids == [5, 6, 7]
    assert (out.prompt_tokens, out.cached_tokens, out.finish_reason) == (100, 64, "length")


def test_missing_prompt_details_mean_nothing_cached():
    out = read_stream([{"choices": [], "usage": {"prompt_tokens": 10}}], began=0.0)
    assert out.cached_tokens == 0


# -- figures -------------------------------------------------------------------------------


@pytest.mark.parametrize("known, prompt, cached, expected", [
    (300, 400, 0, 300),    # everything evicted: the whole earlier context again
    (300, 400, 288, 12),   # all full blocks kept: the partial tail block only
    (300, 400, 320, 0),    # cached beyond the earlier context (shared prefix): nothing
    (0, 200, 0, 0),        # first turn: nothing was computed before
])
def test_recomputed_tokens(known, prompt, cached, expected):
    assert recomputed_tokens(known, prompt, cached) == expected


def test_recomputed_tokens_rejects_impossible_usage():
    with pytest.raises(ValueError):
        recomputed_tokens(10, 100, 101)


def test_percentile_nearest_rank():
    assert figures.percentile([5, 1, 3, 2, 4], 50) == 3
    assert figures.percentile(list(range(1, 11)), 90) == 9
    assert figures.percentile([], 50) is None


def _turn(prompt, cached, sent, done, system_blocks=1):
    return {"prompt": prompt, "prompt_tokens": len(prompt), "cached_tokens": cached,
            "private_from_block": system_blocks, "sent_at": sent, "done_at": done, "request_id": "ag-x"}


def test_cross_check_agrees_when_the_events_match_cached_tokens():
    prompt = list(range(1, 4 * 32 + 5))  # 4 full blocks; block 0 is the system prefix
    hashes = block_hash_strings(prompt, 32)
    stored = [(10.5, hashes[2:4]), (11.5, hashes[1:2])]  # blocks 2, 3 in the window; 1 before
    got = figures.cross_check([_turn(prompt, 64, 10.0, 11.0)], stored, 32)
    assert (got["checked_turns"], got["agreed"], got["mismatch_count"]) == (1, 1, 0)


def test_cross_check_catches_a_cached_tokens_figure_the_events_contradict():
    prompt = list(range(1, 4 * 32 + 5))
    hashes = block_hash_strings(prompt, 32)
    stored = [(10.5, hashes[1:4])]  # three private blocks stored, yet it claims 2 blocks cached
    got = figures.cross_check([_turn(prompt, 64, 10.0, 11.0)], stored, 32)
    assert got["mismatch_count"] == 1
    assert got["mismatches"][0]["expected_private_stores"] == 2
    assert got["mismatches"][0]["stored_in_window"] == 3


def test_cross_check_window_closes_when_the_turn_ends():
    """The agent's claim prefill right after the turn re-stores its last block: not the turn's."""
    prompt = list(range(1, 4 * 32 + 5))
    hashes = block_hash_strings(prompt, 32)
    stored = [(10.5, hashes[2:4]), (11.01, hashes[3:4])]
    assert figures.cross_check([_turn(prompt, 64, 10.0, 11.0)], stored, 32)["agreed"] == 1


def test_cross_check_ignores_shared_prefix_and_other_sessions():
    prompt = list(range(1, 3 * 32))
    other = list(range(100, 100 + 3 * 32))
    stored = [(10.5, block_hash_strings(prompt, 32)[:1]), (10.6, block_hash_strings(other, 32))]
    got = figures.cross_check([_turn(prompt, 64, 10.0, 11.0)], stored, 32)
    assert got["agreed"] == 1  # block 0 is shared (not counted), the other session's are not ours


def test_summary_ratios_and_verdict():
    def seg(i, config, recomputed, bg, wall=10.0):
        turns = [{"turn": 1, "recomputed_tokens": r, "known_tokens": 400, "prompt_tokens": 450,
                  "ttft_s": 0.1} for r in recomputed]
        background = [{"prompt_tokens": 300, "latency_s": 0.1}] * bg
        return {"segment": i, "config": config, "turns": turns, "figures": figures.segment_figures(turns, background, wall),
                "failed_turns": [], "background_refusals": 0, "peak_rss_mib": 100,
                "cross_check": {"checked_turns": len(turns), "agreed": len(turns)}}

    table = figures.summarize([seg(0, "stock", [400, 400], 100), seg(1, "claims", [20, 40], 97),
                               seg(2, "greedy", [10, 10], 50)], baseline="stock")
    assert table["claims"]["recompute_reduction_vs_stock"] == pytest.approx(400 / 30)
    assert table["claims"]["background_throughput_vs_stock"] == pytest.approx(0.97)
    assert table["claims"]["background_throughput_vs_stock_paired"] == pytest.approx(0.97)
    assert figures.verdict(table["claims"]) == {"met": True, "reasons": []}
    starved = figures.verdict(table["greedy"])
    assert not starved["met"] and "background throughput 0.50x" in starved["reasons"][0]


def test_claim_event_counts_split_refusals_by_client():
    events = [{"type": "claim.accepted"}, {"type": "claim.harmed"},
              {"type": "request.refused", "request_id": "ag3-s1-t2-a0"},
              {"type": "request.refused", "request_id": "bg3-bg0-4-a0"},
              {"type": "request.refused", "request_id": "bg3-bg1-9-a1"}]
    counts = figures.claim_event_counts(events, "ag3", "bg3")
    assert (counts["accepted"], counts["harmed"], counts["agent_turns_refused"], counts["background_refused"]) == (1, 1, 1, 2)
    assert figures.per_claim(counts)["background_refused"] == 2.0


def test_paired_ratio_compares_each_segment_with_its_nearest_baseline():
    def seg(i, config, bg):
        return {"segment": i, "config": config, "figures": {"background_requests_per_s": bg}}

    # load drifts down over the run; each claims segment is compared with its neighbour
    segments = [seg(0, "base", 20.0), seg(1, "claims", 19.0), seg(2, "claims", 9.5), seg(3, "base", 10.0)]
    assert figures.paired_ratio(segments, "claims", "base", "background_requests_per_s") == pytest.approx(0.95)
    # a tie takes the mean of both neighbours
    tie = [seg(0, "base", 10.0), seg(1, "claims", 15.0), seg(2, "base", 20.0)]
    assert figures.paired_ratio(tie, "claims", "base", "background_requests_per_s") == pytest.approx(1.0)


def test_claim_prefill_counts_the_blocks_a_claim_stored_in_its_window():
    context = list(range(1, 4 * 32 + 1))  # 4 full blocks; block 0 shared
    hashes = block_hash_strings(context, 32)
    stored = [(20.0, hashes[1:4]),  # the turn computed them earlier
              (30.02, hashes[3:4]),  # the claim's prefill recomputed the last block
              (31.0, hashes[3:4])]  # something later, not the claim's
    claim = {"prompt": context, "sent_at": 30.0, "done_at": 30.05}
    assert figures.claim_prefill_blocks([claim], stored, 32, system_blocks=1) == 1
