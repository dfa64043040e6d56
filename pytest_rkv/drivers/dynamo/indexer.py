"""Dynamo's standalone KV indexer (`python -m dynamo.indexer`), fed by engines' KV events.

It subscribes to each worker's ZMQ KV event stream (vLLM's own wire format, evictions
included) and answers `POST /query {"token_ids": [...], "model_name": ...}` with the
number of the prompt's tokens each worker caches: Dynamo's global KV index, without its
router. Its HTTP server binds every interface and has no host option, so it runs inside
the driver's loopback-only network namespace and is queried from the namespace's thread.

Worker ids are integers to the indexer; `INDEX_IDS` maps the RKV worker names to them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

from pytest_rkv.drivers.dynamo.deploy import dynamo_version
from pytest_rkv.drivers.netns import LoopbackNamespace
from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.errors import HarnessError, ProtocolViolation, ServerStartError

PORT = 8090  # the namespace is the driver's alone: nothing else can hold it
MODEL_NAME = "default"
QUERY_TIMEOUT = 10.0


def indexer_argv(python: Path, endpoints: Mapping[str, str], block_size: int) -> list[str]:
    workers = ",".join(f"{i}={endpoint}" for i, endpoint in enumerate(endpoints.values(), start=1))
    return [str(python), "-m", "dynamo.indexer", "--port", str(PORT), "--block-size", str(block_size),
            "--threads", "1", "--model-name", MODEL_NAME, "--workers", workers]


def overlap_by_worker(answer: object, names: Sequence[str]) -> dict[str, int]:
    """The indexer's `/query` answer as cached tokens per worker name.

    Its shape (1.6.1): `{"scores": {"<worker id>": {"<dp rank>": tokens}}, ...}`, ids and
    ranks as JSON strings; workers with nothing cached are absent. A worker's score is its
    best rank's (one rank per worker here)."""
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, dict):
        raise ProtocolViolation(f"the Dynamo indexer's /query answered {answer!r}, not {{'scores': {{...}}}}")
    found: dict[str, int] = {}
    for key, ranks in scores.items():
        index = int(key) - 1 if str(key).isdigit() else -1
        if not 0 <= index < len(names) or not isinstance(ranks, dict) \
                or not all(isinstance(v, int) and v >= 0 for v in ranks.values()):
            raise ProtocolViolation(f"the Dynamo indexer scores worker {key!r} as {ranks!r}; it knows {list(names)}")
        found[names[index]] = max(ranks.values(), default=0)
    return found


class KvIndex:
    def __init__(self, netns: LoopbackNamespace, python: Path, workdir: Path, *, block_size: int,
                 endpoints: Mapping[str, str]) -> None:
        self.netns, self.python, self.workdir = netns, python, workdir
        self.names = list(endpoints)
        self.argv = indexer_argv(python, endpoints, block_size)
        self.process: ManagedProcess | None = None
        self.http: requests.Session | None = None
        self.version = dynamo_version(python)

    def start(self, timeout: float) -> None:
        self.process = ManagedProcess(self.netns.wrap(self.argv), log_path=self.workdir / "dynamo-indexer.log",
                                      name="Dynamo KV indexer")
        self.http = self.netns.call(requests.Session)
        try:
            self.process.start(self._answers, timeout=timeout, poll=0.1)
        except ServerStartError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(grace=1.0)
        if self.http is not None:
            self.http.close()

    def check_alive(self) -> None:
        if self.process is not None:
            self.process.check_alive()

    def log_tail(self, lines: int = 20) -> str:
        return self.process.log_tail(lines) if self.process is not None else ""

    def overlap(self, tokens: Sequence[int]) -> dict[str, int]:
        """Cached prompt tokens per worker, as Dynamo's index has them now."""
        return overlap_by_worker(self._query(list(tokens)), self.names)

    def wait_empty(self, timeout: float = 10.0) -> None:
        """Until the index holds no block of any worker (`GET /dump` lists, per model, the
        stored events that rebuild it: none when it is empty)."""
        deadline = time.monotonic() + timeout
        while True:
            dump = self._get("/dump")
            if not isinstance(dump, dict) or not all(isinstance(v, dict) for v in dump.values()):
                raise ProtocolViolation(f"the Dynamo indexer's /dump answered {str(dump)[:300]}")
            held = sum(len(v.get("events") or []) for v in dump.values())
            if held == 0:
                return
            if time.monotonic() > deadline:
                raise HarnessError(f"the Dynamo index still holds {held} stored events {timeout:g}s after "
                                   "every engine was reset and stepped")
            time.sleep(0.05)

    def _get(self, path: str) -> object:
        if self.http is None:
            raise HarnessError("the Dynamo indexer was queried before it started")
        http = self.http
        return self.netns.call(lambda: http.get(f"http://127.0.0.1:{PORT}{path}", timeout=QUERY_TIMEOUT).json())

    def _query(self, tokens: list[int]) -> object:
        if self.http is None:
            raise HarnessError("the Dynamo indexer was queried before it started")
        http = self.http
        url = f"http://127.0.0.1:{PORT}/query"

        def ask() -> object:
            resp = http.post(url, json={"token_ids": tokens, "model_name": MODEL_NAME}, timeout=QUERY_TIMEOUT)
            if resp.status_code != 200:
                raise ProtocolViolation(f"the Dynamo indexer's /query answered {resp.status_code}: {resp.text[:300]}")
            return resp.json()

        return self.netns.call(ask)

    def _answers(self) -> bool:
        try:
            self._query([0])
            return True
        except (requests.RequestException, ProtocolViolation):
            return False
