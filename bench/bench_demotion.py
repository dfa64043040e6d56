"""What demotion and restore cost in the vLLM adapter with LMCache as its host tier.

    python bench/bench_demotion.py [--sizes 10,20,40,60] [--trials 5] [--json out.json]

One `vllm+rkv+lmcache` server (the suite's own driver: LMCache's cache server, vLLM with
the adapter, 80-block pool of 32 tokens), then, per claim size k and trial, from a reset:

1. `claim`: `POST /v1/kv/claims` for a demotable hard claim of k blocks. It answers once
   the prefill has run *and* the tier confirmed storing every block (docs/vllm-adapter.md).
2. `demote`: a 79-block request that fits only if the claim is demoted (it is), against
   `intruder`: the same request size on a clean pool (a reset, no claim). The difference
   is what deciding and performing the demotion adds to the request.
3. `restore`: the claim's prefix plus one token, served by restoring the claim from the
   tier (`claim.restored`, then `claim.reused`); then `resident`: the same again, now a
   device hit; then `cold`: a fresh prompt of the same length, computed from nothing.

Every request is timed at the client (HTTP round trip, `max_tokens` 1). Reported per size:
medians over trials, and restore / cold and restore / resident ratios measured in the same
trial. Each trial checks the outcome it times (demoted, restored, cached tokens), so a
figure never times a path that did not happen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_rkv.contract import ClaimRequest, ClaimState, CompletionRequest  # noqa: E402
from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.vllm_rkv_lmcache import VllmRkvLmcacheDriver  # noqa: E402
from pytest_rkv.workload import prompt_tokens  # noqa: E402

BLOCK = 32
INTRUDER_BLOCKS = 79  # one short of the pool: room only once any claim is demoted


def _timed(call):
    began = time.perf_counter()
    result = call()
    return (time.perf_counter() - began) * 1000.0, result


def trial(driver, k: int, n: int) -> dict[str, float]:
    def complete(tag: str, blocks: int, extra: int = 0):
        return _timed(lambda: driver.complete(CompletionRequest(
            prompt=prompt_tokens(tag, blocks, BLOCK, extra), max_tokens=1)).unwrap())

    driver.reset()
    intruder_ms, _ = complete(f"intruder-plain-{k}-{n}", INTRUDER_BLOCKS)
    driver.reset()
    claim_ms, claim = _timed(lambda: driver.claim(ClaimRequest(
        prompt_token_ids=prompt_tokens(f"claim-{k}-{n}", k, BLOCK), demotable=True)).unwrap())
    demote_ms, _ = complete(f"intruder-{k}-{n}", INTRUDER_BLOCKS)
    state = driver.get_claim(claim.claim_id).unwrap().state
    assert state == ClaimState.DEMOTED, f"the {k}-block claim is {state.value} after the intruder"
    restore_ms, restored = complete(f"claim-{k}-{n}", k, 1)
    reuse = restored.rkv.reuse if restored.rkv else []
    assert [(r.claim_id, r.restored) for r in reuse] == [(claim.claim_id, True)], reuse
    assert restored.usage.prompt_tokens_details.cached_tokens == k * BLOCK
    resident_ms, resident = complete(f"claim-{k}-{n}", k, 1)
    assert [r.restored for r in resident.rkv.reuse] == [False]
    cold_ms, cold = complete(f"cold-{k}-{n}", k, 1)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    return {"claim_ms": claim_ms, "intruder_ms": intruder_ms, "demote_ms": demote_ms,
            "restore_ms": restore_ms, "resident_ms": resident_ms, "cold_ms": cold_ms,
            "restore_over_cold": restore_ms / cold_ms, "restore_over_resident": restore_ms / resident_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,20,40,60", help="claim sizes in blocks")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    with tempfile.TemporaryDirectory(prefix="rkv-bench-demotion-") as work:
        driver = VllmRkvLmcacheDriver(DriverSettings(workdir=Path(work), startup_timeout=900))
        began = time.monotonic()
        driver.start()
        try:
            startup_s = time.monotonic() - began
            trial(driver, sizes[0], -1)  # warm-up, not reported
            rows = {k: [] for k in sizes}
            for n in range(args.trials):  # sizes interleaved within each trial round
                for k in sizes:
                    rows[k].append(trial(driver, k, n))
        finally:
            driver.stop()

    result = {"startup_s": round(startup_s, 1), "trials": args.trials, "sizes": {}}
    for k, runs in rows.items():
        result["sizes"][k] = {key: round(statistics.median(r[key] for r in runs), 3 if "_over_" in key else 1)
                              for key in runs[0]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
