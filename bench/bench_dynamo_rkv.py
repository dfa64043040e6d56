"""What claims on a routed deployment cost and whether they stick: `dynamo+rkv`.

    python bench/bench_dynamo_rkv.py [--trials 20] [--json out.json]

One `dynamo+rkv` deployment (the suite's own driver: two vLLM engines with the claims
adapter, Dynamo's standalone KV indexer, the pytest-rkv router), then per trial, from a
reset: a 20-block hard claim placed by the router (on odd trials after a 50-block one, so
it lands on the other worker), then, alternating which goes first,

* `routed`: the claim's prefix plus one fresh token through the router with no hint
  (index query, both workers' pools, then the chosen worker), and
* `direct`: the same prompt with another fresh token sent straight to the claim's
  worker, as a client that already knew where the claim is would (no router at all).

Reported: the share of routed requests served by the claim's worker (each one must also
be a full hit credited to the claim), medians of both latencies, the median of the
per-trial ratio routed / direct, the router's own decision time (`choose`: the index
query and two pool reads) timed alone, start-up, and the peak RSS and PSS of every
process of the deployment (engine-core and worker children included), sampled every
0.5 s. Stock Dynamo's frontend is not in this path (the router is ours), so "added
routing latency" is against no router, not against Dynamo's.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_rkv.contract import ClaimRequest, CompletionRequest  # noqa: E402
from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.dynamo_rkv import DynamoRkvDriver  # noqa: E402
from pytest_rkv.workload import prompt_tokens  # noqa: E402

BLOCK = 32
CLAIM_BLOCKS = 20
MARK_ENV = "RKV_BENCH_DYNAMO_RKV"


class MemorySampler(threading.Thread):
    """Peak summed RSS and PSS (MiB) of the processes whose environment carries the mark."""

    def __init__(self, mark: str) -> None:
        super().__init__(daemon=True)
        self.needle = f"{MARK_ENV}={mark}".encode()
        self.peak_rss = self.peak_pss = 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            rss = pss = 0
            for pid in self.deployment():
                try:
                    with open(f"/proc/{pid}/smaps_rollup") as f:
                        for line in f:
                            if line.startswith(("Rss:", "Pss:")):
                                kib = int(line.split()[1])
                                rss, pss = (rss + kib, pss) if line.startswith("Rss") else (rss, pss + kib)
                except OSError:
                    continue
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss / 1024), max(self.peak_pss, pss / 1024)

    def deployment(self) -> set[int]:
        """The marked processes and all their descendants: vLLM's engine-core and worker
        processes are spawned with an environment of their own, without the mark."""
        parent, marked = {}, set()
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if self.needle in f.read().split(b"\0"):
                        marked.add(pid)
            except (OSError, ValueError, IndexError):
                continue
        found = set(marked)
        for pid in parent:
            chain, seen = pid, set()
            while chain in parent and chain not in seen:
                if chain in marked:
                    found.add(pid)
                    break
                seen.add(chain)
                chain = parent[chain]
        return found


def _timed(call):
    began = time.perf_counter()
    result = call()
    return (time.perf_counter() - began) * 1000.0, result


def trial(driver: DynamoRkvDriver, n: int) -> dict:
    driver.reset()
    if n % 2:  # a 50-block claim first, so the measured one goes to the other worker
        driver.place(ClaimRequest(prompt_token_ids=prompt_tokens(f"filler-{n}", 50, BLOCK))).unwrap()
    claim = driver.place(ClaimRequest(prompt_token_ids=prompt_tokens(f"claim-{n}", CLAIM_BLOCKS, BLOCK))).unwrap()
    prefix = prompt_tokens(f"claim-{n}", CLAIM_BLOCKS, BLOCK)

    def routed():
        reply, where = driver.route(CompletionRequest(prompt=prefix + [7], max_tokens=1))
        return reply.unwrap(), where.worker

    def direct():
        return driver.engines[claim.worker].complete(CompletionRequest(prompt=prefix + [9], max_tokens=1)).unwrap()

    if n % 2:
        direct_ms, direct_done = _timed(direct)
        routed_ms, (done, served) = _timed(routed)
    else:
        routed_ms, (done, served) = _timed(routed)
        direct_ms, direct_done = _timed(direct)
    choose_ms, _ = _timed(lambda: driver._router().choose(prefix + [11]))
    credited = [(r.claim_id, r.worker, r.tokens) for r in (done.rkv.reuse if done.rkv else [])]
    full = credited == [(claim.claim_id, claim.worker, CLAIM_BLOCKS * BLOCK)]
    for answer in (done, direct_done):
        assert answer.usage.prompt_tokens_details.cached_tokens == CLAIM_BLOCKS * BLOCK, answer.usage
    return {"claim_worker": claim.worker, "served_by": served, "credited": full,
            "routed_ms": routed_ms, "direct_ms": direct_ms, "choose_ms": choose_ms, "ratio": routed_ms / direct_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rkv-bench-dynamo-rkv-") as work:
        os.environ[MARK_ENV] = work  # every process of the deployment inherits it
        sampler = MemorySampler(work)
        sampler.start()
        driver = DynamoRkvDriver(DriverSettings(workdir=Path(work), startup_timeout=900))
        began = time.monotonic()
        driver.start()
        try:
            startup_s = time.monotonic() - began
            trial(driver, -1)  # warm-up, not reported
            runs = [trial(driver, n) for n in range(args.trials)]
        finally:
            driver.stop()
            sampler.done.set()
            sampler.join()

    on_claim_worker = sum(r["served_by"] == r["claim_worker"] and r["credited"] for r in runs)
    result = {
        "startup_s": round(startup_s, 1),
        "trials": args.trials,
        "claims_per_worker": {w: sum(r["claim_worker"] == w for r in runs) for w in driver.workers()},
        "routed_to_claim_worker": f"{on_claim_worker}/{len(runs)}",
        "median_routed_ms": round(statistics.median(r["routed_ms"] for r in runs), 1),
        "median_direct_ms": round(statistics.median(r["direct_ms"] for r in runs), 1),
        "median_ratio_routed_over_direct": round(statistics.median(r["ratio"] for r in runs), 3),
        "median_choose_ms": round(statistics.median(r["choose_ms"] for r in runs), 1),
        "peak_rss_mib": round(sampler.peak_rss),
        "peak_pss_mib": round(sampler.peak_pss),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
