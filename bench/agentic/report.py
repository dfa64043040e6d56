"""The table (markdown) and the plot (PNG) of one run's `agentic.json`.

    python bench/agentic/report.py bench/agentic/results/agentic.json   # redraw both
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(x, fmt: str = "{:.0f}") -> str:
    if x is None:
        return "n/a"
    if x == float("inf"):
        return "inf"
    return fmt.format(x)


def _claim_prefill(row: dict, table: dict) -> str:
    """Recomputed tokens per turn with the claims' own materializing prefills added, and
    the reduction against stock that leaves."""
    total = row.get("recomputed_tokens_per_turn_with_claim_prefill")
    if total is None:
        return "-"
    stock = (table.get("stock") or {}).get("recomputed_tokens_per_turn_mean")
    return f"{total:.0f}" + (f" ({stock / total:.1f}x vs stock)" if stock and total else "")


def markdown(result: dict) -> str:
    table = result["table"]
    lines = [
        f"Measured {result['measured_at']}, {result['total_wall_s']:.0f} s in total; "
        f"plan {' | '.join(b + ': ' + ', '.join(c) for b, c in result['plan'])}.",
        "",
        "What the agents recompute (turns after a session's first; reductions are ratios of the means):",
        "",
        "| configuration | recomputed tokens / turn, mean | median | share of earlier context recomputed "
        "| reduction vs stock | vs no-claims | + claims' own prefill, per turn | TTFT p50 / p90 | KV-event check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        check = row["cross_check"]
        lines.append(
            f"| `{name}` | {_f(row['recomputed_tokens_per_turn_mean'])} "
            f"| {_f(row['recomputed_tokens_per_turn_median'])} "
            f"| {_f(row['recomputed_share_of_known'], '{:.0%}')} "
            f"| {_f(row.get('recompute_reduction_vs_stock'), '{:.1f}x')} "
            f"| {_f(row.get('recompute_reduction_vs_same_server'), '{:.1f}x')} "
            f"| {_claim_prefill(row, table)} "
            f"| {_f(row['ttft_ms_p50'])} / {_f(row['ttft_ms_p90'])} ms "
            f"| {check['agreed']}/{check['checked_turns']} turns agree "
            f"({_f(row.get('preemptions'))} preemptions) |")
    lines += [
        "",
        "What it costs the rest of the traffic (background = closed-loop one-shot clients; "
        "median over segments; paired = each segment against the nearest baseline segment in time):",
        "",
        "| configuration | agent turns/s | background req/s | vs stock | vs stock, paired "
        "| vs no-claims, paired | background refusals | failed agent turns | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(
            f"| `{name}` | {_f(row['agent_turns_per_s'], '{:.2f}')} "
            f"| {_f(row['background_requests_per_s'], '{:.2f}')} "
            f"| {_f(row.get('background_throughput_vs_stock'), '{:.2f}x')} "
            f"| {_f(row.get('background_throughput_vs_stock_paired'), '{:.2f}x')} "
            f"| {_f(row.get('background_throughput_vs_same_server'), '{:.2f}x')} "
            f"| {row['background_refusals']} | {row['failed_turns']} | {row['peak_rss_mib']} MiB |")
    claims = {n: r for n, r in table.items() if "claim_events" in r}
    if claims:
        lines += ["", "Claims (from the RKV event log; per accepted claim in brackets):", "",
                  "| configuration | claim attempts | accepted | refused at claim time | reused | harmed "
                  "| expired | demoted / restored | agent turns refused | background refused |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in claims.items():
            ev, per = row["claim_events"], row["claim_events_per_claim"]
            attempts = ", ".join(f"{k} {v}" for k, v in sorted(row.get("claim_attempts", {}).items()))
            lines.append(
                f"| `{name}` | {attempts} | {ev['accepted']} | {ev['refused_at_claim_time']} "
                f"| {ev['reused']} ({_f(per['reused'], '{:.2f}')}) | {ev['harmed']} ({_f(per['harmed'], '{:.2f}')}) "
                f"| {ev['expired']} ({_f(per['expired'], '{:.2f}')}) | {ev['demoted']} / {ev['restored']} "
                f"| {ev['agent_turns_refused']} | {ev['background_refused']} |")
    verdicts = result["target"]["verdicts"]
    if verdicts:
        lines += ["", "Target (recomputed tokens cut >= 5x, background keeps >= 0.95x of stock throughput):", ""]
        for name, both in verdicts.items():
            for against, v in both.items():
                label = "against stock vLLM" if against == "vs_stock" else "against no-claims on the same server (paired)"
                lines.append(f"- `{name}`, {label}: "
                             + ("**met**" if v["met"] else "**missed**: " + "; ".join(v["reasons"])))
    loads = [s["load_average_before_after"] for s in result["segments"]]
    if loads:
        flat = [x for pair in loads for x in pair]
        per_seg = ", ".join(f"{s['config']} {s['figures']['background_requests_per_s']:.1f}"
                            for s in result["segments"])
        lines += ["", f"Noise: load average (1 min) {min(flat):.1f}-{max(flat):.1f} at segment starts/ends "
                      f"on {result['machine']['cpus']} CPUs; background req/s per segment in run order: {per_seg}."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["table"])
    per_turn = {n: [t["recomputed_tokens"] for s in result["segments"] if s["config"] == n
                    for t in s["turns"] if t["turn"] > 0] for n in names}
    ttft = {n: [t["ttft_s"] * 1000 for s in result["segments"] if s["config"] == n
                for t in s["turns"] if t["turn"] > 0] for n in names}
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.4))
    ax1.boxplot([per_turn[n] or [0] for n in names], showmeans=True)
    ax1.set_xticks(range(1, len(names) + 1), names)
    ax1.set_ylabel("prefill tokens recomputed per agent turn")
    ax1.set_title("Recomputed context (turns after the first)")
    ax2.boxplot([ttft[n] or [0] for n in names], showmeans=True, whis=(10, 90))
    ax2.set_xticks(range(1, len(names) + 1), names)
    ax2.set_ylabel("time to first token (ms)")
    ax2.set_yscale("log")
    ax2.set_title("TTFT per agent turn (whiskers p10-p90)")
    for x, name in enumerate(names, start=1):
        segs = [s for s in result["segments"] if s["config"] == name]
        ax3.scatter([x] * len(segs), [s["figures"]["background_requests_per_s"] for s in segs], zorder=3)
        for s in segs:
            ax3.annotate(f"#{s['segment']}", (x, s["figures"]["background_requests_per_s"]),
                         textcoords="offset points", xytext=(6, -3), fontsize=7)
    ax3.set_xticks(range(1, len(names) + 1), names)
    ax3.set_ylim(bottom=0)
    ax3.set_ylabel("background requests/s")
    ax3.set_title("Background throughput per segment (#run order)")
    for ax in (ax1, ax2, ax3):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Multi-turn agents + background traffic, one live vLLM per configuration "
                 f"({result['measured_at']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("results") / "agentic.json"
    result = json.loads(src.read_text())
    (src.parent / "table.md").write_text(markdown(result))
    plot(result, src.parent / "agentic.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
