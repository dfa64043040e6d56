"""Wall time of the full reference suite, serial, one pytest process per run.

Runs the in-process and the HTTP reference backends alternately in one invocation (so both
see the same machine noise) and prints the median and spread of each, and their ratio.

    python bench/bench_reference.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one_run(backend: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(ROOT / "suites"), f"--rkv-backend={backend}",
             "-q", "-p", "no:cacheprovider", "--rkv-report-dir", tmp],
            cwd=ROOT, capture_output=True, text=True,
        )
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{backend} run failed:\n{proc.stdout[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"reference": [], "reference-http": []}
    for _ in range(args.runs):
        for backend in times:
            times[backend].append(one_run(backend))
    for backend, values in times.items():
        print(f"{backend:15} median {statistics.median(values):5.2f} s  "
              f"min {min(values):5.2f}  max {max(values):5.2f}  ({args.runs} runs)")
    ratio = statistics.median(times["reference-http"]) / statistics.median(times["reference"])
    print(f"reference-http / reference: {ratio:.2f}x")


if __name__ == "__main__":
    main()
