"""Overhead of the RKV adapter on vLLM, with no claims, and the cost of claim bookkeeping.

    python bench/bench_vllm_adapter.py [--rounds 40] [--requests 64] [--concurrency 4]
                                       [--max-tokens 16] [--omp-threads 1] [--skip-live]
                                       [--skip-steps] [--json out.json]

Two measurements (bench/README.md has the figures and how to read them):

1. **live** — the same claim-free workload against two real servers started side by side
   in this run: stock vLLM (backend `vllm`) and vLLM with the adapter loaded (backend
   `vllm+rkv`: RkvScheduler + the `rkv` endpoint plugin, every request through the adapter's
   `/v1/completions`). Each round runs two fresh prompt sets in ABBA order (BAAB in odd
   rounds), so both servers see the same cache history and drift cancels; every segment
   starts after a pause (a vLLM CPU worker busy-polls for 1 s after its last request) and,
   as the machine is shared, once its CPUs are mostly idle (`--quiet`). Both servers run
   one OMP thread (`--omp-threads`), so neither they nor the client oversubscribe 2 cores.
   Per round: throughput (requests/s, output tokens/s) and median/p90 request latency;
   reported: the median over rounds of the adapter/stock ratios, their quartiles, and the
   pooled medians. (`--paired-runs` adds an alternative design: each request sent to both
   servers back to back; on two cores it measures the busy-poll interference more than the
   adapter, see `_paired`.)
2. **steps** — vLLM's real scheduler in-process (no model, `adapters.vllm.harness`), a
   steady decode+admission workload (16 requests in flight), timing `schedule()` +
   `update_from_output()` per step for stock `Scheduler` and `RkvScheduler` with 0, 100 and
   1000 resident claims, in pools of 2k, 20k and 200k blocks, with the claims either
   untouched by the workload or each admission reusing one. Flat across pool size and claim
   count = O(claims touched), not O(pool).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_rkv.adapters.vllm.harness import tokens  # noqa: E402 (after the sys.path line)

BLOCK = 32


# ----------------------------------------------------------------------------- live


def _workload(round_no: int, n: int, groups: int = 4) -> list[list[int]]:
    """n prompts: a 4-block prefix shared by a quarter of them, then 1-3 own blocks and a
    few odd tokens (so prefix-cache hits, misses and partial blocks all occur)."""
    prompts = []
    for i in range(n):
        shared = tokens(f"r{round_no}-g{i % groups}", 4, BLOCK)
        own = tokens(f"r{round_no}-u{i}", 1 + i % 3, BLOCK, extra=i % 7)
        prompts.append(shared + own)
    return prompts


def _auth(driver) -> dict:
    """The driver's own credentials (the adapter's server has tenants: tenant A's token)."""
    token = driver.http.headers.get("Authorization")
    return {"Authorization": token} if token else {}


def _run_round(base_url: str, served: str, prompts: list[list[int]], max_tokens: int,
               concurrency: int, tag: str, headers: dict | None = None) -> dict:
    import requests

    from pytest_rkv.contract import CompletionRequest
    from pytest_rkv.drivers.vllm.answers import completion_body

    local = threading.local()

    def one(i: int) -> tuple[float, int]:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        body = completion_body(CompletionRequest(prompt=prompts[i], max_tokens=max_tokens,
                                                 request_id=f"{tag}-{i}"), served)
        began = time.perf_counter()
        resp = session.post(base_url + "/v1/completions", json=body, timeout=120, headers=headers)
        took = time.perf_counter() - began
        resp.raise_for_status()
        return took, resp.json()["usage"]["completion_tokens"]

    began = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - began
    latencies = sorted(r[0] for r in results)
    return {
        "latencies_ms": [x * 1000 for x in latencies],
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens_per_s": sum(r[1] for r in results) / wall,
        "latency_median_ms": statistics.median(latencies) * 1000,
        "latency_p90_ms": latencies[int(0.9 * (len(latencies) - 1))] * 1000,
    }


def _cpu_idle_fraction(window: float = 0.5) -> float:
    """Share of all CPUs idle over `window` seconds (Linux /proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total
    idle0, total0 = sample()
    time.sleep(window)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def _wait_quiet(threshold: float, timeout: float) -> float:
    """Wait until the machine is mostly idle (others' jobs share it); seconds waited."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if _cpu_idle_fraction() >= threshold:
            break
    return time.monotonic() - began


def _paired(drivers: dict, args: argparse.Namespace) -> dict:
    """Every request goes to both servers back to back (ABBA over consecutive pairs), one
    request at a time by default: both servers run the same requests under the same machine
    conditions, a fraction of a second apart, and never at once (two vLLM CPU servers busy
    together oversubscribe two cores: each runs 2 OMP threads, and its worker busy-polls for
    1 s after its last request). Throughput ratio = total stock time / total adapter time
    (at one request in flight, throughput is 1 / latency)."""
    import requests

    from pytest_rkv.contract import CompletionRequest
    from pytest_rkv.drivers.vllm.answers import completion_body

    n = args.pairs
    prompts = _workload(1000, n)
    local = threading.local()
    lat: dict[str, list[float]] = {"stock": [0.0] * n, "adapter": [0.0] * n}

    def send(name: str, i: int) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        d = drivers[name]
        body = completion_body(CompletionRequest(prompt=prompts[i], max_tokens=args.max_tokens,
                                                 request_id=f"pair-{name}-{i}"), d.model.served_name)
        began = time.perf_counter()
        resp = session.post(d.plan.base_url + "/v1/completions", json=body, timeout=120, headers=_auth(d))
        lat[name][i] = time.perf_counter() - began
        resp.raise_for_status()

    def pair(i: int) -> None:  # ABBA over consecutive pairs
        for name in (("stock", "adapter") if i % 4 in (0, 3) else ("adapter", "stock")):
            send(name, i)

    time.sleep(args.cooldown)
    waited = _wait_quiet(args.quiet, args.quiet_timeout)
    began = time.perf_counter()
    with ThreadPoolExecutor(args.pair_concurrency) as pool:
        list(pool.map(pair, range(n)))
    wall = time.perf_counter() - began
    ratios = sorted(a / s for a, s in zip(lat["adapter"], lat["stock"]))
    return {
        "pairs": n, "concurrency": args.pair_concurrency, "wall_s": round(wall, 1), "waited_for_quiet_s": round(waited, 1),
        "mean_latency_ms": {k: 1000 * statistics.fmean(v) for k, v in lat.items()},
        "median_latency_ms": {k: 1000 * statistics.median(v) for k, v in lat.items()},
        "throughput_ratio": sum(lat["stock"]) / sum(lat["adapter"]),
        "median_latency_ratio": statistics.median(lat["adapter"]) / statistics.median(lat["stock"]),
        "per_pair_latency_ratio_quartiles": statistics.quantiles(ratios, n=4),
    }


def live(args: argparse.Namespace) -> dict:
    from pytest_rkv.drivers.base import DriverSettings
    from pytest_rkv.drivers.vllm.driver import VllmDriver
    from pytest_rkv.drivers.vllm_rkv import VllmRkvDriver

    if args.omp_threads:  # both servers alike (they inherit this process's environment)
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)
    tmp = Path(tempfile.mkdtemp(prefix="rkv-bench-adapter-"))
    drivers = {"stock": VllmDriver(DriverSettings(workdir=tmp / "stock", startup_timeout=300)),
               "adapter": VllmRkvDriver(DriverSettings(workdir=tmp / "adapter", startup_timeout=300))}
    starts = {}
    try:
        for name, driver in drivers.items():
            began = time.monotonic()
            driver.start()
            starts[name] = round(time.monotonic() - began, 1)
            print(f"[live] {name} server ready in {starts[name]} s", file=sys.stderr)
        paired = []
        if args.paired_runs:
            _paired(drivers, argparse.Namespace(**{**vars(args), "pairs": 16}))  # warm-up
            paired = [_paired(drivers, args) for _ in range(args.paired_runs)]
        for got in paired:
            print(f"[live] paired x{got['pairs']}: throughput ratio {got['throughput_ratio']:.3f}, "
                  f"median latency ratio {got['median_latency_ratio']:.3f}", file=sys.stderr)
        rounds: list[dict] = []
        waited_quiet = 0.0
        for r in range(args.rounds + 1 if args.rounds else 0):  # round 0 warms both servers up, not reported
            # ABBA within a round (BAAB in odd rounds), each server seeing the same two
            # prompt sets in the same order, with a pause before every segment: an idle
            # vLLM server keeps a core busy for ~1 s after its last request.
            a, b = ("stock", "adapter") if r % 2 == 0 else ("adapter", "stock")
            halves = [_workload(2 * r, args.requests // 2), _workload(2 * r + 1, args.requests // 2)]
            parts: dict[str, list[dict]] = {"stock": [], "adapter": []}
            for name, half in ((a, 0), (b, 0), (b, 1), (a, 1)):
                time.sleep(args.cooldown)
                waited_quiet += _wait_quiet(args.quiet, args.quiet_timeout)
                d = drivers[name]
                parts[name].append(_run_round(d.plan.base_url, d.model.served_name, halves[half],
                                              args.max_tokens, args.concurrency, f"{name}-r{r}-{half}",
                                              headers=_auth(d)))
            entry = {"round": r, "order": f"{a[0]}{b[0]}{b[0]}{a[0]}".upper()}
            for name, got in parts.items():
                wall = sum(g["wall_s"] for g in got)
                entry[name] = {
                    "wall_s": wall,
                    "requests_per_s": args.requests // 2 * 2 / wall,
                    "output_tokens_per_s": sum(g["output_tokens_per_s"] * g["wall_s"] for g in got) / wall,
                    "latency_median_ms": statistics.median(x for g in got for x in g["latencies_ms"]),
                    "latency_p90_ms": sorted(x for g in got for x in g["latencies_ms"])[
                        int(0.9 * (len(got[0]["latencies_ms"]) * 2 - 1))],
                }
            if r:
                rounds.append(entry)
                print(f"[live] round {r} ({entry['order']}): stock {entry['stock']['requests_per_s']:.2f} "
                      f"req/s {entry['stock']['latency_median_ms']:.0f} ms, adapter "
                      f"{entry['adapter']['requests_per_s']:.2f} req/s {entry['adapter']['latency_median_ms']:.0f} ms",
                      file=sys.stderr)
        adapter_metrics = drivers["adapter"].metrics()
    finally:
        for driver in drivers.values():
            driver.stop()

    result: dict = {
        "server_start_s": starts,
        "omp_threads": args.omp_threads or "vLLM default",
        "adapter_prefix_cache_hits_total": adapter_metrics.get("vllm:prefix_cache_hits_total"),
    }
    if paired:
        result.update({
            "paired": paired,
            "paired_throughput_ratio_median": statistics.median(p["throughput_ratio"] for p in paired),
            "paired_median_latency_ratio_median": statistics.median(p["median_latency_ratio"] for p in paired),
        })
    if not rounds:
        return result

    def ratios(key: str) -> list[float]:
        return [e["adapter"][key] / e["stock"][key] for e in rounds]

    def med(name: str, key: str) -> float:
        return statistics.median(e[name][key] for e in rounds)

    return {**result, "segments": {
        "server_start_s": starts,
        "waited_for_quiet_s": round(waited_quiet, 1),
        "quiet_threshold_idle": args.quiet,
        "rounds": rounds,
        "workload": {"requests_per_round": args.requests, "concurrency": args.concurrency,
                     "max_tokens": args.max_tokens, "prompt_blocks": "4 shared + 1..3 own (+0..6 tokens)"},
        "median_requests_per_s": {"stock": med("stock", "requests_per_s"), "adapter": med("adapter", "requests_per_s")},
        "median_latency_ms": {"stock": med("stock", "latency_median_ms"), "adapter": med("adapter", "latency_median_ms")},
        "throughput_ratio_median": statistics.median(ratios("requests_per_s")),
        "throughput_ratio_min": min(ratios("requests_per_s")),
        "throughput_ratio_quartiles": statistics.quantiles(ratios("requests_per_s"), n=4),
        "token_throughput_ratio_median": statistics.median(ratios("output_tokens_per_s")),
        "latency_median_ratio_median": statistics.median(ratios("latency_median_ms")),
        "latency_p90_ratio_median": statistics.median(ratios("latency_p90_ms")),
    }}


# ----------------------------------------------------------------------------- steps


def _step_cost(model_dir: Path, *, adapter: bool, pool_blocks: int, claims: int, touched: bool,
               steps: int, in_flight: int = 16) -> dict:
    from pytest_rkv.adapters.vllm.harness import StepLoop, build_scheduler

    loop = StepLoop(build_scheduler(model_dir, adapter=adapter, num_blocks=pool_blocks,
                                    rkv={"claim_budget_blocks": pool_blocks - 1}, kv_events=False))
    for i in range(claims):
        reply = loop.call("claim", prompt_token_ids=tokens(f"claim{i}", 1, BLOCK))
        assert reply["body"]["state"] == "resident", reply
    s = loop.scheduler
    from vllm.v1.outputs import ModelRunnerOutput

    made = 0

    def admit() -> None:
        nonlocal made
        if touched and claims:
            prompt = tokens(f"claim{made % claims}", 1, BLOCK) + tokens(f"w{made}", 3, BLOCK, extra=5)
        else:
            prompt = tokens(f"w{made}", 4, BLOCK, extra=5)
        s.add_request(loop.request(f"w{made}", prompt, max_tokens=8, rkv=adapter))
        made += 1

    for _ in range(in_flight):
        admit()
    spent = 0.0
    measured = 0
    for step in range(steps + 50):
        t0 = time.perf_counter()
        out = s.schedule()
        t1 = time.perf_counter()
        ids = list(out.num_scheduled_tokens)
        mro = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=[[7] for _ in ids], logprobs=None,
                                prompt_logprobs_dict={}, pooler_output=[])
        t2 = time.perf_counter()
        outputs = s.update_from_output(out, mro)
        t3 = time.perf_counter()
        if step >= 50:  # warm-up excluded
            spent += (t1 - t0) + (t3 - t2)
            measured += 1
        finished = sum(1 for eco in outputs.values() for o in eco.outputs if o.finish_reason is not None)
        for _ in range(finished):
            admit()
    reused = 0
    if adapter:
        reused = sum(1 for e in s.rkv.book.events if e["type"] == "claim.reused")
    return {"us_per_step": spent / measured * 1e6, "requests": made, "claim_reuse_events": reused}


def steps_bench(args: argparse.Namespace) -> dict:
    from pytest_rkv.adapters.vllm.harness import write_model_dir

    model_dir = write_model_dir(Path(tempfile.mkdtemp(prefix="rkv-bench-model-")))
    rows = []
    for pool_blocks in (2_001, 20_001, 200_001):
        configs = [("stock", False, 0, False), ("adapter", True, 0, False),
                   ("adapter", True, 100, False), ("adapter", True, 1000, False),
                   ("adapter", True, 1000, True)]
        for name, adapter, claims, touched in configs:
            best = None
            for _ in range(args.step_repeats):  # best of N: the machine is shared
                got = _step_cost(model_dir, adapter=adapter, pool_blocks=pool_blocks, claims=claims,
                                 touched=touched, steps=args.steps)
                if best is None or got["us_per_step"] < best["us_per_step"]:
                    best = got
            row = {"pool_blocks": pool_blocks - 1, "scheduler": name, "claims": claims,
                   "claims_touched_per_admission": 1 if touched else 0, **best}
            rows.append(row)
            print(f"[steps] pool {pool_blocks - 1:>7} {name:<7} claims {claims:>4} "
                  f"touched {int(touched)}: {best['us_per_step']:.1f} us/step", file=sys.stderr)
    return {"steps_per_run": args.steps, "in_flight": 16, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96, help="requests per paired run (each sent to both)")
    parser.add_argument("--paired-runs", type=int, default=0, help="also run N paired runs (see _paired)")
    parser.add_argument("--pair-concurrency", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=16, help="ABBA segment rounds (after one warm-up round)")
    parser.add_argument("--requests", type=int, default=32, help="requests per server per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--cooldown", type=float, default=1.5, help="pause before each segment (s)")
    parser.add_argument("--quiet", type=float, default=0.85,
                        help="before each segment, wait until this share of the CPUs is idle")
    parser.add_argument("--quiet-timeout", type=float, default=60.0)
    parser.add_argument("--omp-threads", type=int, default=1,
                        help="OMP_NUM_THREADS for both servers (0: vLLM's default, all cores); one "
                             "thread each keeps two servers, their API processes and the client "
                             "from oversubscribing a 2-core machine")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--skip-live", action="store_true")
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result: dict = {"measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.skip_steps:
        result["steps"] = steps_bench(args)
    if not args.skip_live:
        result["live"] = live(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
