"""The long run of the reference runtime's state machine (tests/reference/test_reference_model.py).

Runs `RuntimeMachine` with hypothesis until at least `--steps` rule steps have executed,
checking every invariant after every step, and prints the step count, the number of
machine runs, the violations (0 unless it raises) and the wall time.

    python bench/bench_reference_model.py [--steps 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis.stateful import run_state_machine_as_test  # noqa: E402

from tests.test_reference_model import RuntimeMachine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--steps-per-run", type=int, default=200)
    args = parser.parse_args()
    batch = settings(max_examples=100, stateful_step_count=args.steps_per_run, deadline=None,
                     database=None, suppress_health_check=list(HealthCheck))
    start, batches = time.perf_counter(), 0
    while RuntimeMachine.steps < args.steps:
        run_state_machine_as_test(RuntimeMachine, settings=batch)  # raises on any violation
        batches += 1
    elapsed = time.perf_counter() - start
    print(f"steps: {RuntimeMachine.steps}  batches of 100 machine runs: {batches}  violations: 0  "
          f"wall: {elapsed:.1f} s  ({RuntimeMachine.steps / elapsed:.0f} steps/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
