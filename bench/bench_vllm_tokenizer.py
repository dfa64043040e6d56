"""What the generated tiny model's tokenizer costs a vLLM server: start-up time and memory.

    python bench/bench_vllm_tokenizer.py [--rounds 2] [--json out.json]

The stock `vllm` backend's server (same launcher, tiny model, 80-block pool) started
alternately with its tokenizer (the default since chat support) and with
`--skip-tokenizer-init` (the former default), ABBA over rounds so drift cancels. Per start:
seconds until `GET /health` answers and the driver's checks pass (`startup_seconds`), and the
resident memory (RSS, MiB) of every process of the server's group once it is ready, summed.
Reported: medians per variant and the with/without ratio of the medians (bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pytest_rkv.drivers.base import DriverSettings  # noqa: E402
from pytest_rkv.drivers.vllm.driver import VllmDriver  # noqa: E402
from pytest_rkv.drivers.vllm.server import MARKER_ENV  # noqa: E402


def _rss_mib(workdir: Path) -> float:
    """RSS of every process whose environment names this server's workdir (server.py's
    marker), so other servers on the machine never count."""
    import psutil

    total = 0
    needle = f"{MARKER_ENV}={workdir}".encode()
    for proc in psutil.process_iter(["pid"]):
        try:
            with open(f"/proc/{proc.pid}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    total += proc.memory_info().rss
        except (OSError, psutil.Error):
            continue
    return total / 2**20


def one_start(tmp: Path, tokenizer: bool, n: int) -> dict:
    workdir = (tmp / f"{'tok' if tokenizer else 'notok'}-{n}").resolve()
    extra = () if tokenizer else ("--skip-tokenizer-init",)
    driver = VllmDriver(DriverSettings(workdir=workdir, startup_timeout=900), extra_server_args=extra)
    driver.start()
    try:
        return {"tokenizer": tokenizer, "startup_s": driver.startup_seconds, "rss_mib": round(_rss_mib(workdir), 1)}
    finally:
        driver.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="rkv-bench-tok-") as tmp:
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for tokenizer in order:
                runs.append(one_start(Path(tmp), tokenizer, r))
                print(json.dumps(runs[-1]), flush=True)
    out = {"runs": runs}
    for key in ("startup_s", "rss_mib"):
        with_tok = statistics.median(r[key] for r in runs if r["tokenizer"])
        without = statistics.median(r[key] for r in runs if not r["tokenizer"])
        out[key] = {"with_tokenizer": with_tok, "without": without, "ratio": round(with_tok / without, 3)}
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
