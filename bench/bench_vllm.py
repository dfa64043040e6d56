"""Cost of the stock-vLLM row: wall time of `pytest suites --rkv-backend=vllm` (one server
start included) and the memory of the vLLM server while it runs.

    python bench/bench_vllm.py [--runs N] [--pss] [--json out.json] [--backend vllm+lmcache ...]

With several `--backend`s the runs alternate between them (run 1 of each, run 2 of each,
...), so their figures are measured side by side. For `vllm+lmcache` the memory includes
LMCache's cache server (another descendant), and the result adds the tier's start-up and
the canonical re-query's cached tokens (the `eviction_observable` and `host_tier` tests).

Memory is sampled every `--interval` seconds over every descendant of the pytest child
process (the vLLM API server, its engine core and worker, their resource tracker; the
server runs in its own session but stays a descendant). Reported:

* `server_peak_rss_mib`: peak of the *sum* of RSS over the server's processes. Shared
  pages (torch libraries mapped by all three) are counted once per process, so this is
  an upper bound on what the machine needs.
* `server_peak_pss_mib` (with `--pss`): the same with proportional set size, which
  splits shared pages between their users; closer to the real footprint, slower to read.
* `pytest_peak_rss_mib`: the pytest process itself.

The figures go to stdout as JSON (and to `--json`). Nothing here mocks anything: it is
the suite a user runs.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pytest_rkv.evidence import bundle_dir

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
_SUMMARY = re.compile(r"(\d+) (passed|failed|unsupported|untestable|inapplicable|error|errors|skipped)")


class MemorySampler(threading.Thread):
    def __init__(self, root: psutil.Process, interval: float, pss: bool) -> None:
        super().__init__(daemon=True)
        self.root, self.interval, self.pss = root, interval, pss
        self.peak_rss = self.peak_pss = self.peak_root_rss = 0
        self.peak_procs = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                children = self.root.children(recursive=True)
                self.peak_root_rss = max(self.peak_root_rss, self.root.memory_info().rss)
            except psutil.Error:
                break
            rss = pss = 0
            for proc in children:
                try:
                    if self.pss:
                        full = proc.memory_full_info()
                        rss += full.rss
                        pss += full.pss
                    else:
                        rss += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(children))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def run_once(interval: float, pss: bool, extra: list[str], backend: str = "vllm") -> dict:
    report_dir = Path(tempfile.mkdtemp(prefix="rkv-bench-vllm-"))
    argv = [sys.executable, "-m", "pytest", "suites", f"--rkv-backend={backend}", "-q",
            "-p", "no:cacheprovider", "--rkv-report-dir", str(report_dir), *extra]
    began = time.monotonic()
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(psutil.Process(child.pid), interval, pss)
    sampler.start()
    out, _ = child.communicate()
    wall = time.monotonic() - began
    sampler.stop()

    row_path = bundle_dir(report_dir, backend) / "row.json"
    row = json.loads(row_path.read_text()) if row_path.exists() else {}
    last_line = out.strip().splitlines()[-1] if out.strip() else ""
    result = {
        "command": " ".join(argv[1:]),
        "exit_code": child.returncode,
        "wall_seconds": round(wall, 1),
        "server_startup_seconds": row.get("runtime_details", {}).get("startup_seconds"),
        "server_peak_rss_mib": round(sampler.peak_rss / MIB),
        "pytest_peak_rss_mib": round(sampler.peak_root_rss / MIB),
        "server_processes": sampler.peak_procs,
        "outcomes": {kind: int(n) for n, kind in _SUMMARY.findall(last_line)},
        "label": row.get("label"),
        "runtime": f"{row.get('runtime')} {row.get('runtime_version')}" if row else None,
        "build": row.get("runtime_details", {}).get("build"),
        "report_dir": str(report_dir),
        "backend": backend,
        "tier_startup_seconds": row.get("runtime_details", {}).get("tier_startup_seconds"),
        "requery_cached_tokens": _requery_cached_tokens(row),
    }
    if pss:
        result["server_peak_pss_mib"] = round(sampler.peak_pss / MIB)
    if child.returncode not in (0, 1):  # 1 = some test failed, which is evidence, not breakage
        result["output_tail"] = out[-3000:]
    return result


def _requery_cached_tokens(row: dict) -> dict:
    """Cached tokens of the 60-block resident re-queried after the 70-block intruder."""
    out = {}
    for section, name, key in (("substrates", "eviction_observable", "resident_blocks_surviving"),
                               ("substrates", "host_tier", "cached_tokens_again")):
        tests = row.get(section, {}).get(name, {}).get("tests") or [{}]
        value = tests[0].get("evidence", {}).get(key)
        if value is not None:
            out[f"{name}.{key}"] = value
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.25, help="memory sampling period (s)")
    parser.add_argument("--pss", action="store_true", help="also sample PSS (reads smaps; slower)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--backend", action="append", help="backend(s) to measure, alternated (default vllm)")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for the suite run (after --)")
    args = parser.parse_args()

    backends = [b.strip() for arg in (args.backend or ["vllm"]) for b in arg.split(",") if b.strip()]
    runs = [run_once(args.interval, args.pss, args.pytest_args, backend)
            for _ in range(args.runs) for backend in backends]
    text = json.dumps(runs if len(runs) > 1 else runs[0], indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(r["exit_code"] in (0, 1) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
