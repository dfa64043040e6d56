"""What the `dynamo` row costs, and how sticky Dynamo's KV routing is.

    python bench/bench_dynamo.py --trials 20 --latency 30 [--json out.json]

Measures, in one process, one deployment at a time:

* deployment start-up (namespace, 2 mocker workers, KV-routing frontend, until the
  frontend lists both workers) and a reset (redeploy), medians over `--deploys`;
* peak memory of the deployment's processes (RSS summed, and PSS), sampled every 0.2 s;
* routing stickiness: over `--trials` fresh 20-block prefixes, the share of reuses
  (prefix + one new token) the router sends to the worker that holds the prefix;
* routing latency: median time of a completion routed by the KV router against the same
  completion forced to its worker with `nvext.backend_instance_id` (the router still
  runs, but only to honour the hint), side by side, alternating;
* the suite's wall time (`pytest suites --rkv-backend=dynamo`), run after the above.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pytest_rkv.contract import CompletionRequest
from pytest_rkv.drivers.base import DriverSettings
from pytest_rkv.drivers.dynamo.driver import DynamoDriver
from pytest_rkv.workload import prompt_tokens

REPO = Path(__file__).resolve().parents[1]


def marked_pids(workdir: Path) -> list[int]:
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if str(workdir).encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def memory_kib(pids: list[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
        except OSError:
            continue
    return rss, pss


class Sampler(threading.Thread):
    def __init__(self, workdir: Path) -> None:
        super().__init__(daemon=True)
        self.workdir, self.peak, self.stop_flag = workdir, (0, 0), threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            rss, pss = memory_kib(marked_pids(self.workdir))
            self.peak = (max(self.peak[0], rss), max(self.peak[1], pss))
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--deploys", type=int, default=5)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--latency", type=int, default=30)
    parser.add_argument("--no-suite", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="rkv-bench-dynamo-") as tmp:
        workdir = Path(tmp).resolve()
        sampler = Sampler(workdir)
        sampler.start()
        driver = DynamoDriver(DriverSettings(workdir=workdir, startup_timeout=600))
        try:
            driver.start()
            out["startup_s"] = driver.startup_seconds
            for _ in range(args.deploys):
                driver.complete(CompletionRequest(prompt=[5, 6, 7]))  # a used deployment is redeployed
                driver.reset()
            out["reset_s_median"] = statistics.median(driver.redeploy_seconds)

            hits, cached_ok = 0, 0
            for trial in range(args.trials):
                prefix = prompt_tokens(f"bench-{trial}", 20, 16)
                _, first = driver.route(CompletionRequest(prompt=prefix))
                reply, again = driver.route(CompletionRequest(prompt=prefix + [1]))
                hits += again.worker == first.worker
                cached_ok += reply.unwrap().usage.prompt_tokens_details.cached_tokens == 320
            out["routed_to_prefix_worker"] = f"{hits}/{args.trials}"
            out["reuse_fully_cached"] = f"{cached_ok}/{args.trials}"

            routed_ms, forced_ms = [], []
            prefix = prompt_tokens("bench-latency", 20, 16)
            _, home = driver.route(CompletionRequest(prompt=prefix))
            for i in range(args.latency):
                req = CompletionRequest(prompt=prefix + [i + 1])
                t = time.perf_counter()
                driver.route(req)
                routed_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                driver.route(req, worker=home.worker)
                forced_ms.append((time.perf_counter() - t) * 1000)
            out["routed_ms_median"] = round(statistics.median(routed_ms), 2)
            out["forced_ms_median"] = round(statistics.median(forced_ms), 2)
        finally:
            driver.stop()
            sampler.stop_flag.set()
            sampler.join()
        out["peak_rss_mib"] = round(sampler.peak[0] / 1024)
        out["peak_pss_mib"] = round(sampler.peak[1] / 1024)

        if not args.no_suite:
            report = workdir / "suite"
            t = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "pytest", str(REPO / "suites"), "--rkv-backend=dynamo",
                                   "--rkv-report-dir", str(report), "-q", "-p", "no:cacheprovider"],
                                  capture_output=True, text=True, cwd=REPO)
            out["suite_wall_s"] = round(time.monotonic() - t, 1)
            out["suite_summary"] = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    out["load_average"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
