"""From one segment's records and event streams to its figures, and from segments to the table.

Pure functions (no server): unit-tested on synthetic records.

**The KV-event cross-check.** `cached_tokens` is the server's own claim about a turn; the
block events are an independent account of the same prefill. For a turn, the prompt's full
blocks after the shared system prefix are private to its session (vLLM's block hash chains
through every earlier token), and only that session's turn can store them while the turn
runs (the agent is sequential: its claim prefill happens after the turn). So the number of
those block hashes in `blocks.stored` events stamped inside the turn's window must equal the
private full blocks the turn computed by `cached_tokens`:

    full_blocks(prompt) - max(cached_tokens / block_size, system_blocks)

A turn where they differ is reported with both counts; a stream with unfilled gaps makes
the check unknown, not passed.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence

from pytest_rkv.drivers.vllm.hashing import block_hash_strings

# Engine and client stamp with the same clock. The window opens a little early (rounding)
# but closes exactly when the client read the last chunk: right after that the agent
# claims its context, and that claim's prefill re-stores the context's last full block
# (vLLM never serves a prompt's last block from cache), which is not the turn's work.
SLACK_S = 0.05


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def expected_private_stores(prompt_tokens: int, cached_tokens: int, block_size: int, system_blocks: int) -> int:
    full = prompt_tokens // block_size
    return max(0, full - max(cached_tokens // block_size, system_blocks))


def cross_check(turns: Iterable[dict], stored: Sequence[tuple[float, Sequence[str]]], block_size: int,
                sample_every: int = 1) -> dict:
    """Check every `sample_every`-th turn (with its prompt in `prompt`) against block stores.

    `stored` is (timestamp, block hashes) of every `blocks.stored` event of the segment."""
    checked = agreed = 0
    mismatches = []
    for i, turn in enumerate(turns):
        if i % sample_every:
            continue
        hashes = block_hash_strings(turn["prompt"], block_size)[turn["private_from_block"]:]
        wanted = set(hashes)
        lo, hi = turn["sent_at"] - SLACK_S, turn["done_at"]
        seen = sum(1 for ts, batch in stored if lo <= ts <= hi for h in batch if h in wanted)
        expected = expected_private_stores(turn["prompt_tokens"], turn["cached_tokens"], block_size,
                                           turn["private_from_block"])
        checked += 1
        if seen == expected:
            agreed += 1
        else:
            mismatches.append({"request_id": turn["request_id"], "cached_tokens": turn["cached_tokens"],
                               "expected_private_stores": expected, "stored_in_window": seen})
    return {"checked_turns": checked, "agreed": agreed, "mismatches": mismatches[:10],
            "mismatch_count": len(mismatches)}


def claim_prefill_blocks(claims: Iterable[dict], stored: Sequence[tuple[float, Sequence[str]]],
                         block_size: int, system_blocks: int) -> int:
    """Private blocks the claims' own materializing prefills stored (KV events in each claim
    call's window): the recomputation claims themselves cost. With the context cached this
    is about one block per claim (vLLM never serves a prompt's last block from cache)."""
    total = 0
    for claim in claims:
        wanted = set(block_hash_strings(claim["prompt"], block_size)[system_blocks:])
        lo, hi = claim["sent_at"] - SLACK_S, claim["done_at"] + SLACK_S
        total += sum(1 for ts, batch in stored if lo <= ts <= hi for h in batch if h in wanted)
    return total


def claim_event_counts(events: Iterable[dict], agent_prefix: str, background_prefix: str) -> dict:
    """RKV events of a segment, counted by kind; request refusals split by who was refused."""
    kinds = Counter(e["type"] for e in events)
    refused = [e for e in events if e["type"] == "request.refused"]
    return {
        "accepted": kinds["claim.accepted"],
        "materialized": kinds["claim.materialized"],
        "materialization_failed": kinds["claim.materialization_failed"],
        "refused_at_claim_time": kinds["claim.refused"],
        "reused": kinds["claim.reused"],
        "harmed": kinds["claim.harmed"],
        "expired": kinds["claim.expired"],
        "released": kinds["claim.released"],
        "demoted": kinds["claim.demoted"],
        "restored": kinds["claim.restored"],
        "restore_failed": kinds["claim.restore_failed"],
        "agent_turns_refused": sum(1 for e in refused if str(e.get("request_id")).startswith(agent_prefix)),
        "background_refused": sum(1 for e in refused if str(e.get("request_id")).startswith(background_prefix)),
    }


def per_claim(counts: dict) -> dict:
    n = counts.get("accepted") or 0
    keys = ("reused", "harmed", "expired", "demoted", "restored", "refused_at_claim_time",
            "agent_turns_refused", "background_refused")
    return {k: (round(counts[k] / n, 3) if n else None) for k in keys}


def segment_figures(turns: list[dict], background: list[dict], wall_s: float) -> dict:
    """Per-segment figures. Recomputation counts turns after the first of each session
    (a first turn has nothing of its own to keep)."""
    later = [t for t in turns if t["turn"] > 0]
    recomputed = [t["recomputed_tokens"] for t in later]
    known = sum(min(t["known_tokens"], t["prompt_tokens"]) for t in later)
    ttft = [t["ttft_s"] * 1000 for t in later]
    return {
        "agent_turns": len(turns),
        "agent_turns_after_first": len(later),
        "recomputed_tokens_total": sum(recomputed),
        "recomputed_tokens_per_turn_mean": statistics.fmean(recomputed) if recomputed else None,
        "recomputed_tokens_per_turn_median": statistics.median(recomputed) if recomputed else None,
        "recomputed_share_of_known": (sum(recomputed) / known) if known else None,
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p90": percentile(ttft, 90),
        "ttft_ms_p50_first_turns": percentile([t["ttft_s"] * 1000 for t in turns if t["turn"] == 0], 50),
        "agent_turns_per_s": len(turns) / wall_s if wall_s else None,
        "background_requests": len(background),
        "background_requests_per_s": len(background) / wall_s if wall_s else None,
        "background_prompt_tokens_per_s": sum(b["prompt_tokens"] for b in background) / wall_s if wall_s else None,
        "background_latency_ms_p50": percentile([b["latency_s"] * 1000 for b in background], 50),
        "wall_s": wall_s,
    }


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def paired_ratio(segments: list[dict], config: str, baseline: str, key: str) -> float | None:
    """Median over `config`'s segments of figure `key` divided by the same figure of the
    nearest `baseline` segment in run order (the mean of both neighbours on a tie). Run order
    is time, so each ratio compares segments measured under nearly the same machine load."""
    base = [(s["segment"], s["figures"][key]) for s in segments if s["config"] == baseline]
    ratios = []
    for seg in (s for s in segments if s["config"] == config):
        if not base or seg["figures"][key] is None:
            continue
        gap = min(abs(i - seg["segment"]) for i, _ in base)
        near = [v for i, v in base if abs(i - seg["segment"]) == gap and v is not None]
        if near and statistics.fmean(near) > 0:
            ratios.append(seg["figures"][key] / statistics.fmean(near))
    return statistics.median(ratios) if ratios else None


def summarize(segments: list[dict], baseline: str, same_server: str | None = None) -> dict:
    """Per configuration: medians over its segments of the per-segment figures, pooled
    per-turn figures, and the ratios against `baseline` (stock vLLM): of pooled figures
    (`*_vs_stock`) and paired with the nearest segment (`*_vs_stock_paired`); and, when
    `same_server` ran, paired ratios against it (`*_vs_same_server`)."""
    by_config: dict[str, list[dict]] = {}
    for seg in segments:
        by_config.setdefault(seg["config"], []).append(seg)
    table = {}
    for name, segs in by_config.items():
        figs = [s["figures"] for s in segs]
        later = [t for s in segs for t in s["turns"] if t["turn"] > 0]
        recomputed = [t["recomputed_tokens"] for t in later]
        ttft = [t["ttft_s"] * 1000 for t in later]
        row = {
            "segments": len(segs),
            "agent_turns_after_first": len(later),
            "recomputed_tokens_per_turn_mean": statistics.fmean(recomputed) if recomputed else None,
            "recomputed_tokens_per_turn_median": statistics.median(recomputed) if recomputed else None,
            "recomputed_share_of_known": _median(f["recomputed_share_of_known"] for f in figs),
            "ttft_ms_p50": percentile(ttft, 50),
            "ttft_ms_p90": percentile(ttft, 90),
            "agent_turns_per_s": _median(f["agent_turns_per_s"] for f in figs),
            "background_requests_per_s": _median(f["background_requests_per_s"] for f in figs),
            "background_refusals": sum(s["background_refusals"] for s in segs),
            "failed_turns": sum(len(s["failed_turns"]) for s in segs),
            "peak_rss_mib": max((s.get("peak_rss_mib") or 0) for s in segs),
        }
        prefill = [s["claim_prefill_tokens"] for s in segs if s.get("claim_prefill_tokens") is not None]
        if prefill and later:
            row["claim_prefill_tokens_per_turn"] = sum(prefill) / len(later)
            row["recomputed_tokens_per_turn_with_claim_prefill"] = (
                (sum(recomputed) + sum(prefill)) / len(later))
        if any("claim_events" in s for s in segs):
            counts = Counter()
            for s in segs:
                counts.update(s.get("claim_events") or {})
            row["claim_events"] = dict(counts)
            row["claim_events_per_claim"] = per_claim(counts)
            attempts = Counter(c["outcome"].split(":")[0] for s in segs for c in s.get("claims", []))
            row["claim_attempts"] = dict(attempts)
        check = [s["cross_check"] for s in segs if s.get("cross_check")]
        row["cross_check"] = {"checked_turns": sum(c["checked_turns"] for c in check),
                              "agreed": sum(c["agreed"] for c in check)}
        counted = [s["vllm_counters"] for s in segs if s.get("vllm_counters")]
        row["preemptions"] = (sum(c.get("vllm:num_preemptions_total", 0) for c in counted)
                              if counted else None)
        table[name] = row
    base = table.get(baseline)
    if base:
        for name, row in table.items():
            row["recompute_reduction_vs_stock"] = _ratio(base["recomputed_tokens_per_turn_mean"],
                                                         row["recomputed_tokens_per_turn_mean"])
            row["background_throughput_vs_stock"] = _ratio(row["background_requests_per_s"],
                                                           base["background_requests_per_s"])
            row["ttft_p50_vs_stock"] = _ratio(row["ttft_ms_p50"], base["ttft_ms_p50"])
            row["agent_turns_per_s_vs_stock"] = _ratio(row["agent_turns_per_s"], base["agent_turns_per_s"])
            row["background_throughput_vs_stock_paired"] = paired_ratio(
                segments, name, baseline, "background_requests_per_s")
    if same_server in table:
        for name, row in table.items():
            row["recompute_reduction_vs_same_server"] = _ratio(
                table[same_server]["recomputed_tokens_per_turn_mean"], row["recomputed_tokens_per_turn_mean"])
            row["background_throughput_vs_same_server"] = paired_ratio(
                segments, name, same_server, "background_requests_per_s")
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    if b == 0:
        return float("inf") if a > 0 else None
    return a / b


def verdict(row: dict, reduction_target: float = 5.0, background_target: float = 0.95,
            against: str = "stock") -> dict:
    """The issue's target for one claims configuration, with the reason when it is missed.
    `against` "stock" (the issue's baseline) or "same_server" (the paired estimate)."""
    red = row.get(f"recompute_reduction_vs_{against}")
    bg = row.get(f"background_throughput_vs_{against}")
    reasons = []
    if red is None or red < reduction_target:
        reasons.append(f"recomputed-token reduction {_fmt(red)}x < {reduction_target}x")
    if bg is None or bg < background_target:
        reasons.append(f"background throughput {_fmt(bg)}x of {against.replace('_', '-')} < {background_target}x")
    return {"met": not reasons, "reasons": reasons}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else ("inf" if x == float("inf") else f"{x:.2f}")
