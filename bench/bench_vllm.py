"""Cost of a live runtime's row: wall time of `pytest suites --rkv-backend=vllm` (one server
start included) and the memory of the server while it runs; `--backend vllm,sglang` measures
several rows side by side (alternating, one server at a time).

    python bench/bench_vllm.py [--backend vllm[,sglang]] [--runs N] [--pss] [--json out.json]

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


def run_once(backend: str, interval: float, pss: bool, extra: list[str]) -> dict:
    report_dir = Path(tempfile.mkdtemp(prefix=f"rkv-bench-{backend}-"))
    argv = [sys.executable, "-m", "pytest", "suites", f"--rkv-backend={backend}", "-q",
            "-p", "no:cacheprovider", "--rkv-report-dir", str(report_dir), *extra]
    began = time.monotonic()
    child = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(psutil.Process(child.pid), interval, pss)
    sampler.start()
    out, _ = child.communicate()
    wall = time.monotonic() - began
    sampler.stop()

    row_path = report_dir / backend / "row.json"
    row = json.loads(row_path.read_text()) if row_path.exists() else {}
    last_line = out.strip().splitlines()[-1] if out.strip() else ""
    result = {
        "backend": backend,
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
    }
    if pss:
        result["server_peak_pss_mib"] = round(sampler.peak_pss / MIB)
    if child.returncode not in (0, 1):  # 1 = some test failed, which is evidence, not breakage
        result["output_tail"] = out[-3000:]
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vllm", help="backend(s), comma-separated, measured alternately")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.25, help="memory sampling period (s)")
    parser.add_argument("--pss", action="store_true", help="also sample PSS (reads smaps; slower)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for the suite run (after --)")
    args = parser.parse_args()

    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    runs = [run_once(b, args.interval, args.pss, args.pytest_args) for _ in range(args.runs) for b in backends]
    text = json.dumps(runs if len(runs) > 1 else runs[0], indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if all(r["exit_code"] in (0, 1) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
