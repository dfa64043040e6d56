"""What claims save in a multi-turn agent workload, measured on live vLLM servers.

    python bench/agentic/run.py [--out bench/agentic/results] [--repeats 2] [options]

One invocation runs every configuration (configs.py) side by side on this machine, in
alternating order (ABBA over `--repeats`), one server up at a time, each server started by
its backend's own driver (the suite's launcher, supervisor and geometry check). Each segment
starts from an empty cache (`reset()`), runs the same seeded workload (workload.py: agent
sessions + closed-loop background traffic) until every session ends, and records:

* per agent turn: prompt and cached tokens (vLLM's `usage.prompt_tokens_details`),
  recomputed tokens, time to first token (streamed), refusals met;
* per background request: tokens, latency; throughput of each kind separately;
* claim attempts and the RKV event log (accepted, reused, harmed, expired, refused ...);
* vLLM's own KV events, to cross-check every turn's `cached_tokens` (figures.cross_check);
* peak memory (RSS summed over the server's processes) and the load average.

Writes `agentic.json` (everything, raw per-turn records included), `table.md` and
`agentic.png` into `--out`, and prints the table. Not part of CI's pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.agentic import configs as configs_mod  # noqa: E402
from bench.agentic import figures  # noqa: E402
from bench.agentic.client import (  # noqa: E402
    AgentRunner,
    BackgroundWorker,
    Endpoint,
    SegmentLog,
    as_dict,
)
from bench.agentic.policy import RefusalPolicy  # noqa: E402
from bench.agentic.workload import GPU_PROFILE, PARAMETER_SOURCES, Params, describe, generate  # noqa: E402

AGENT_TAG, BACKGROUND_TAG = "ag", "bg"
COUNTERS = ("vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


class MemorySampler(threading.Thread):
    """Peak of the summed RSS of a process and all its descendants (the server's tree)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = 0
        self._halt = threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            rss = 0
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join(timeout=5)
        return self.peak_rss


def _counters(driver) -> dict[str, float]:
    metrics = driver.metrics()
    return {k: metrics.get(k, 0.0) for k in COUNTERS}


def _params_from_args(args: argparse.Namespace) -> Params:
    values = {f.name: getattr(args, f.name) for f in fields(Params) if getattr(args, f.name, None) is not None}
    base = replace(Params(), **GPU_PROFILE) if args.gpu else Params()
    return replace(base, **values)


def run_segment(driver, config: configs_mod.Configuration, workload, seg_no: int,
                policy: RefusalPolicy, check_every: int) -> dict:
    driver.reset()
    tag = f"{AGENT_TAG}{seg_no}"
    bg_tag = f"{BACKGROUND_TAG}{seg_no}"
    rkv_mark = 0
    if config.backend != "vllm":
        rkv_mark = max((e.seq for e in driver.events(0)), default=0)
    kv_mark = len(driver.subscriber.events())
    counters_before = _counters(driver)
    ep = Endpoint(driver.plan.base_url, driver.model.served_name, driver.http.headers.get("Authorization"))
    log = SegmentLog()
    stop = threading.Event()
    agents = [AgentRunner(ep, workload, a, tag, log, config.claim, policy, stop)
              for a in range(workload.params.agents)]
    background = [BackgroundWorker(ep, workload, w, bg_tag, log, policy, stop)
                  for w in range(workload.params.background_concurrency)]
    sampler = MemorySampler(driver.server.pid)
    sampler.start()
    load_before = os.getloadavg()
    began, began_wall = time.monotonic(), time.time()
    bg_threads = [threading.Thread(target=w.run, daemon=True) for w in background]
    ag_threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
    for t in bg_threads + ag_threads:
        t.start()
    for t in ag_threads:
        t.join()
    wall, ended_wall = time.monotonic() - began, time.time()
    stop.set()
    for t in bg_threads:
        t.join(timeout=330)
    peak = sampler.stop()
    load_after = os.getloadavg()
    driver.check_alive()
    counters_after = _counters(driver)

    kv_events = driver.block_events()  # settled, gap-checked (raises on a lost batch)
    kv_events = [e for e in kv_events if e.seq > kv_mark]
    stored = [(e.ts, e.block_hashes) for e in kv_events if e.type.value == "blocks.stored" and e.tier == "device"]
    turns = sorted(log.turns, key=lambda t: (t.session, t.turn))
    turn_dicts = [as_dict(t) for t in turns]
    check_input = [{**as_dict(t), "prompt": t.prompt_hash_key} for t in turns]
    # Background requests answered after the last agent turn do not count: both kinds'
    # throughput is measured over the same window, the agents' run.
    bg_in_window = [asdict(b) for b in log.background if began_wall <= b.done_at <= ended_wall]
    result = {
        "config": config.name,
        "backend": config.backend,
        "segment": seg_no,
        "wall_s": round(wall, 2),
        "load_average_before_after": [round(load_before[0], 2), round(load_after[0], 2)],
        "peak_rss_mib": round(peak / 2**20),
        "figures": figures.segment_figures(turn_dicts, bg_in_window, wall),
        "turns": turn_dicts,
        "failed_turns": log.failed_turns,
        "claims": [as_dict(c) for c in log.claims],
        "claim_prefill_tokens": workload.params.block_size * figures.claim_prefill_blocks(
            [{**as_dict(c), "prompt": c.prompt_hash_key} for c in log.claims if c.outcome == "resident"],
            stored, workload.params.block_size, len(workload.system) // workload.params.block_size)
        if config.claim is not None else None,
        "background_refusals": log.background_refusals,
        "errors": log.errors,
        "cross_check": figures.cross_check(check_input, stored, workload.params.block_size,
                                           sample_every=check_every),
        "kv_event_stream": driver.subscriber.stats(),
        # vLLM's own counters over the segment. Preemptions matter to the cross-check: a
        # preempted request recomputes its blocks, which `cached_tokens` (taken at its first
        # admission) does not show and the KV events do.
        "vllm_counters": {k: counters_after.get(k, 0.0) - counters_before.get(k, 0.0) for k in COUNTERS},
    }
    if config.backend != "vllm":
        events = [e.model_dump(mode="json") for e in driver.events(rkv_mark)]
        result["claim_events"] = figures.claim_event_counts(events, tag, bg_tag)
    if log.errors:
        print(f"[agentic] segment {seg_no} {config.name}: {len(log.errors)} client error(s): {log.errors[:3]}",
              file=sys.stderr)
    return result


def start_driver(backend: str, workdir: Path, block_size: int, args: argparse.Namespace):
    from pytest_rkv.drivers.base import DriverSettings
    from pytest_rkv.drivers.registry import driver_class

    settings = DriverSettings(workdir=workdir, model=args.rkv_model, block_size=block_size,
                              startup_timeout=args.startup_timeout)
    driver = driver_class(backend)(settings)
    began = time.monotonic()
    driver.start()
    return driver, round(time.monotonic() - began, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "agentic" / "results",
                        help="where agentic.json, table.md and agentic.png go (default: %(default)s)")
    parser.add_argument("--configs", default="stock,rkv-no-claims,rkv-hard-ttl,rkv-soft",
                        help="comma-separated (default: %(default)s); pending: " + ", ".join(configs_mod.PENDING))
    parser.add_argument("--repeats", type=int, default=2, help="ABBA passes over the configurations (default: %(default)s)")
    parser.add_argument("--ttl", type=float, default=6.0, help="TTL of the hard claims in seconds (default: %(default)s)")
    parser.add_argument("--gpu", action="store_true", help="the GPU-runner workload profile (use with --rkv-model)")
    parser.add_argument("--rkv-model", default=None, help="a model directory or hub id (default: tiny generated Llama)")
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--omp-threads", type=int, default=1,
                        help="OMP_NUM_THREADS for the server (0: vLLM's default); 1 leaves a core "
                             "for the clients on a 2-core machine")
    parser.add_argument("--cooldown", type=float, default=2.0, help="pause before each segment in seconds (default: %(default)s)")
    parser.add_argument("--backoff", type=float, default=0.2, help="first back-off after a refusal in seconds, doubling (default: %(default)s)")
    parser.add_argument("--claim-retries", type=int, default=2)
    parser.add_argument("--turn-retries", type=int, default=6)
    parser.add_argument("--check-every", type=int, default=1,
                        help="cross-check every Nth agent turn against vLLM's KV events")
    parser.add_argument("--workdir", type=Path, default=None, help="server logs (default: a temp dir)")
    group = parser.add_argument_group("workload (workload.Params)")
    for f in fields(Params):
        group.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None,
                           help=f"default {f.default}" + (" (--gpu: %s)" % GPU_PROFILE[f.name]
                                                          if f.name in GPU_PROFILE else ""))
    args = parser.parse_args(argv)
    try:
        params = _params_from_args(args)
        params.validate()
        known = configs_mod.configurations(args.ttl)
        order = configs_mod.ordered([c.strip() for c in args.configs.split(",") if c.strip()], known)
        plan = configs_mod.schedule(order, args.repeats)
    except ValueError as exc:
        parser.error(str(exc))
    from pytest_rkv.drivers.vllm.geometry import USABLE_BLOCKS

    if params.longest_context() > USABLE_BLOCKS * params.block_size:
        parser.error(f"a session may grow to {params.longest_context()} tokens, more than the "
                     f"{USABLE_BLOCKS}-block pool ({USABLE_BLOCKS * params.block_size} tokens); "
                     "lower --turns-max, --tool-result-max or --decode-max")
    if args.omp_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)
    workload = generate(params)
    policy = RefusalPolicy(backoff_s=args.backoff, claim_retries=args.claim_retries,
                           turn_retries=args.turn_retries)
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rkv-bench-agentic-"))
    shown = " | ".join(f"{backend}: {', '.join(names)}" for backend, names in plan)
    print(f"[agentic] plan: {shown}; logs in {workdir}", file=sys.stderr)

    began = time.time()
    segments: list[dict] = []
    servers: list[dict] = []
    seg_no = 0
    for i, (backend, names) in enumerate(plan):
        driver, startup = start_driver(backend, workdir / f"{i}-{backend.replace('+', '_')}",
                                       params.block_size, args)
        try:
            servers.append({"backend": backend, "startup_s": startup, "describe": driver.describe()})
            print(f"[agentic] {backend} ready in {startup} s", file=sys.stderr)
            for name in names:
                time.sleep(args.cooldown)
                seg = run_segment(driver, known[name], workload, seg_no, policy, args.check_every)
                segments.append(seg)
                # Kept as it goes: a failure later in the run loses no measured segment.
                (args.out / "segments.partial.json").write_text(json.dumps(segments, default=str) + "\n")
                f = seg["figures"]
                print(f"[agentic] seg {seg_no} {name}: recomputed/turn "
                      f"{f['recomputed_tokens_per_turn_mean']:.0f}, ttft p50 {f['ttft_ms_p50']:.0f} ms, "
                      f"bg {f['background_requests_per_s']:.2f} req/s, wall {seg['wall_s']} s, "
                      f"check {seg['cross_check']['agreed']}/{seg['cross_check']['checked_turns']}",
                      file=sys.stderr)
                seg_no += 1
        finally:
            driver.stop()

    table = figures.summarize(segments, configs_mod.BASELINE, configs_mod.SAME_SERVER_BASELINE)
    verdicts = {}
    for name, row in table.items():
        if known[name].claim is None:
            continue
        verdicts[name] = {}
        if configs_mod.BASELINE in table:
            verdicts[name]["vs_stock"] = figures.verdict(row)
        if configs_mod.SAME_SERVER_BASELINE in table:
            verdicts[name]["vs_same_server"] = figures.verdict(row, against="same_server")
    result = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(began)),
        "total_wall_s": round(time.time() - began, 1),
        "command": " ".join(["python", "bench/agentic/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()},
        "workload": describe(params),
        "parameter_sources": PARAMETER_SOURCES,
        "configurations": {n: {"backend": c.backend, "claim": asdict(c.claim) if c.claim else None,
                               "description": c.description} for n, c in known.items() if n in table},
        "pending_configurations": configs_mod.PENDING,
        "refusal_policy": asdict(policy),
        "plan": plan,
        "servers": servers,
        "table": table,
        "target": {"recompute_reduction": 5.0, "background_throughput_ratio": 0.95, "verdicts": verdicts},
        "segments": segments,
    }
    (args.out / "agentic.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    (args.out / "segments.partial.json").unlink(missing_ok=True)
    from bench.agentic import report

    text = report.markdown(result)
    (args.out / "table.md").write_text(text)
    report.plot(result, args.out / "agentic.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
