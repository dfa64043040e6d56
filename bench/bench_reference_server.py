"""Load on the reference server: N concurrent clients x M requests each, over real sockets.

Starts `rkv serve` (tenants and an admin token, as the reference-http backend does), then
runs N threads at once, each with its own keep-alive connection, alternating a claim
(POST, one block, 1 s TTL), a completion on its prompt (POST) and a pool read (GET). Counts connection
resets and other transport errors (must be 0), 5xx answers (must be 0) and prints the
p50/p99 latency.

    python bench/bench_reference_server.py [--clients 200] [--requests 50]
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import statistics
import subprocess
import sys
import threading
import time

import requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()

    token, admin = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {**os.environ, "RKV_TOKENS": f"{token}=bench", "RKV_ADMIN_TOKEN": admin}
    # The default pool (80 blocks, budget 64): claims are one block with a 1 s TTL, so many
    # are admitted and many refused (409), both ordinary answers. (A pool of 10^5 blocks
    # would measure the reference pool's O(blocks) scans, not the HTTP stack.)
    server = subprocess.Popen([sys.executable, "-m", "pytest_rkv.cli", "serve", "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = server.stdout.readline()
        url = re.search(r"(http://\S+)", line).group(1)
        threading.Thread(target=server.stdout.read, daemon=True).start()  # drain the log
        latencies: list[float] = []
        failures: list[str] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        barrier = threading.Barrier(args.clients)

        def client(n: int) -> None:
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {token}"
            mine, ok = [], []
            barrier.wait()  # every client starts at once
            for i in range(args.requests):
                tokens = [n + 1, i + 1] * 8  # 16 tokens: one block, distinct per request
                kind = i % 3
                start = time.perf_counter()
                try:
                    if kind == 0:
                        resp = session.post(url + "/v1/kv/claims", json={"prompt_token_ids": tokens, "ttl_s": 1},
                                            timeout=60)
                    elif kind == 1:
                        resp = session.post(url + "/v1/completions", json={"prompt": tokens + [7]}, timeout=60)
                    else:
                        resp = session.get(url + "/v1/kv/pool", timeout=60)
                except requests.RequestException as exc:
                    with lock:
                        failures.append(f"{exc.__class__.__name__}: {exc}"[:200])
                    continue
                mine.append(time.perf_counter() - start)
                ok.append(resp.status_code)
            with lock:
                latencies.extend(mine)
                for code in ok:
                    statuses[code] = statuses.get(code, 0) + 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
        wall = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - wall
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else float("nan")
        print(f"clients {args.clients} x requests {args.requests} = {args.clients * args.requests}; "
              f"answered {len(latencies)}; transport errors {len(failures)}; "
              f"5xx {sum(v for k, v in statuses.items() if k >= 500)}; statuses {dict(sorted(statuses.items()))}")
        print(f"latency p50 {statistics.median(latencies) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; "
              f"wall {wall:.1f} s, {len(latencies) / wall:.0f} requests/s")
        for failure in failures[:5]:
            print("  ", failure)
        return 1 if failures or any(k >= 500 for k in statuses) else 0
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    sys.exit(main())
