"""Wall time of `rkv verify` (replay included) on each given bundle, side by side.

Each run is a fresh `python -m pytest_rkv.cli verify BUNDLE` process: file and manifest
checks, the row model, then the released suite re-run against the bundle's transcript in a
child pytest (`--rkv-backend=replay`). Bundles are verified alternately in one invocation,
so all see the same machine noise; a run that does not verify stops the benchmark.

    python bench/bench_verify.py reports/bundles/*/ [--runs 5]
    # the vLLM bundles, made once:
    # python -m pytest suites --rkv-certify --rkv-backend=vllm,vllm+rkv --rkv-report-dir DIR \
    #     --rkv-startup-timeout 900
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def one_run(bundle: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the verifier and its replay child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "verify", str(bundle)],
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"{bundle} does not verify:\n{proc.stdout[-2000:]}")
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bundles", nargs="+", type=Path)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[Path, list[tuple[float, float]]] = {b: [] for b in args.bundles}
    for _ in range(args.runs):
        for bundle in args.bundles:
            times[bundle].append(one_run(bundle))
    print("| bundle | transcript calls | transcript size | wall median | wall min | wall max | CPU median |")
    print("|---|---|---|---|---|---|---|")
    for bundle, samples in times.items():
        row = json.loads((bundle / "row.json").read_text())
        calls = sum(t["calls"] for s in ("obligations", "substrates", "lowerings")
                    for e in row[s].values() for t in e["tests"])
        size = (bundle / "transcript.jsonl").stat().st_size
        wall = [w for w, _ in samples]
        cpu = [c for _, c in samples]
        print(f"| `{row['backend']}` | {calls} | {size / 1024:.0f} KiB | {statistics.median(wall):.2f} s "
              f"| {min(wall):.2f} s | {max(wall):.2f} s | {statistics.median(cpu):.2f} s |")
    print(f"load average after the runs: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
