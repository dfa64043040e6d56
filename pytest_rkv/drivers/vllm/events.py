"""vLLM's KV cache event stream, received, checked for loss and turned into contract events.

Wire format (vllm/distributed/kv_events.py, `ZmqEventPublisher`):

* PUB socket, multipart frames `(topic, seq as 8-byte big-endian, payload)`; `seq`
  counts from 0, one per published batch (one batch per engine step with events).
* payload = msgpack of `KVEventBatch`, an array `[ts, events, data_parallel_rank]`;
  each event is a map tagged by `"type"`: `BlockStored`, `BlockRemoved`,
  `AllBlocksCleared`.
* A ROUTER "replay" socket re-sends buffered batches from a start seq when sent
  `[b"", start_seq as 8 bytes]`; the answer ends with a frame whose seq is -1.

The structs below mirror vLLM's instead of importing them, so the test process never
imports vLLM (seconds of start-up and a torch import) and a field vLLM adds later is
simply ignored. Only the fields the suite uses are declared.

Loss is never papered over: a seq gap is filled from the replay socket, and a gap the
replay cannot fill is remembered and reported (`unfilled_gaps`), because a silently
missing `BlockRemoved` would turn an eviction into a false "nothing was evicted".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import msgspec

from pytest_rkv.contract import Event, EventType

END_OF_REPLAY = -1
DEVICE_MEDIA = (None, "GPU")  # vLLM labels its device pool "GPU" even on the CPU backend
HOST_MEDIA = ("CPU",)  # the offload tier


# -- wire structs ----------------------------------------------------------------------


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None = None
    token_ids: list[int] = []
    block_size: int = 0
    medium: str | None = None
    session_id: str | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    block_hashes: list[int | bytes]
    medium: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    pass


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True):
    ts: float
    events: list[KvEvent]
    data_parallel_rank: int | None = None


_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def decode_batch(payload: bytes) -> KVEventBatch:
    return _DECODER.decode(payload)


def decode_seq(frame: bytes) -> int:
    return int.from_bytes(frame, "big", signed=True)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def format_block_hash(value: int | bytes) -> str:
    """vLLM exports the low 64 bits of each sha256 block hash as an int (the default,
    `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`), or the raw bytes. Both become lowercase
    hex: 16 digits for the int form, matching `hashing.block_hash_strings`."""
    if isinstance(value, bytes):
        return value.hex()
    return f"{value & 0xFFFF_FFFF_FFFF_FFFF:016x}"


# -- from batches to contract events -------------------------------------------------------


def batch_to_events(batch: KVEventBatch, first_seq: int) -> list[Event]:
    """Contract events for one batch, numbered from `first_seq`.

    * `BlockStored` -> `blocks.stored` (one per vLLM event).
    * consecutive `BlockRemoved` of one batch -> one `blocks.evicted`: vLLM emits one
      event per evicted block, the contract one per eviction act (as the reference
      runtime does). Order relative to stores is kept: only adjacent removals merge.
    * `AllBlocksCleared` -> nothing. It is the echo of our own `/reset_prefix_cache`
      and reaches the stream only after the *next* engine step, i.e. after the
      suite's post-reset mark; mapped to an eviction it would be blamed on the next
      test's request. A reset evicts nothing that a test observes.
    * events of a medium other than the device pool or the host tier are skipped.
    """
    out: list[Event] = []
    seq = first_seq

    def emit(kind: EventType, hashes: list[int | bytes], tier: str) -> None:
        nonlocal seq
        strings = [format_block_hash(h) for h in hashes]
        out.append(Event(seq=seq, ts=batch.ts, type=kind, tier=tier, blocks=len(strings),
                         block_hashes=strings))
        seq += 1

    pending_removed: list[int | bytes] = []
    pending_tier: str | None = None

    def flush_removed() -> None:
        nonlocal pending_removed, pending_tier
        if pending_removed:
            emit(EventType.BLOCKS_EVICTED, pending_removed, pending_tier or "device")
        pending_removed, pending_tier = [], None

    for event in batch.events:
        if isinstance(event, AllBlocksCleared):
            continue
        tier = _tier(event.medium)
        if tier is None:
            continue
        if isinstance(event, BlockRemoved):
            if pending_tier not in (None, tier):
                flush_removed()
            pending_removed = pending_removed + list(event.block_hashes)
            pending_tier = tier
            continue
        flush_removed()
        emit(EventType.BLOCKS_STORED, list(event.block_hashes), tier)
    flush_removed()
    return out


def _tier(medium: str | None) -> str | None:
    if medium in DEVICE_MEDIA:
        return "device"
    if medium in HOST_MEDIA:
        return "host"
    return None


# -- sequence bookkeeping (pure) -------------------------------------------------------------


@dataclass
class SeqTracker:
    """Which publisher seqs have been applied, and which are missing.

    The publisher numbers batches 0, 1, 2, ...; every one must be applied exactly once
    and in order. `classify` says what to do with an arriving seq."""

    next_seq: int = 0
    unfilled: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges

    def classify(self, seq: int) -> str:
        if seq < self.next_seq:
            return "duplicate"
        if seq == self.next_seq:
            return "next"
        return "gap"

    def missing_before(self, seq: int) -> tuple[int, int] | None:
        """The inclusive range of seqs lost before `seq`, or None."""
        return (self.next_seq, seq - 1) if seq > self.next_seq else None

    def applied(self, seq: int) -> None:
        self.next_seq = seq + 1

    def give_up(self, first: int, last: int) -> None:
        """Record [first, last] as lost for good and move past it."""
        self.unfilled.append((first, last))
        self.next_seq = last + 1


# -- the subscriber ------------------------------------------------------------------------


class KvEventSubscriber:
    """A SUB socket on vLLM's publisher, read by a daemon thread.

    `events()` returns everything applied so far as contract events with a local seq
    (1, 2, ... in arrival order), which is what `Driver.block_events(after=...)` pages
    on. The vLLM seq is not reused as the contract seq because one batch can hold many
    events and the contract wants one seq per event.
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None, topic: str = "",
                 replay_timeout: float = 2.0) -> None:
        import zmq  # imported here so the pure parts above need only msgspec

        self._zmq = zmq
        self.endpoint, self.replay_endpoint, self.topic = endpoint, replay_endpoint, topic
        self.replay_timeout = replay_timeout
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._tracker = SeqTracker()
        self._batches = 0
        self._cleared = 0
        self._last_arrival = 0.0
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle --------------------------------------------------------------------
    def start(self) -> None:
        zmq = self._zmq
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        self._sub.connect(self.endpoint)
        self._thread = threading.Thread(target=self._run, name="vllm-kv-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._ctx.destroy(linger=0)

    # -- reading -----------------------------------------------------------------------
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    @property
    def unfilled_gaps(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._tracker.unfilled)

    @property
    def error(self) -> BaseException | None:
        return self._error

    def stats(self) -> dict:
        with self._lock:
            return {"batches": self._batches, "events": len(self._events),
                    "all_blocks_cleared": self._cleared, "next_vllm_seq": self._tracker.next_seq,
                    "unfilled_gaps": list(self._tracker.unfilled)}

    def wait_settled(self, quiet: float = 0.3, limit: float = 3.0) -> bool:
        """Wait until no frame has arrived for `quiet` seconds, counted from now at the
        earliest (a batch for the step that just ended may still be on its way), and at
        most `limit` seconds. True if the stream went quiet."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            with self._lock:
                last = max(self._last_arrival, start)
            if now - last >= quiet:
                return True
            if now - start >= limit:
                return False
            time.sleep(min(0.05, quiet / 4))

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._sub.poll(100):
                    continue
                frames = self._sub.recv_multipart()
                with self._lock:
                    self._last_arrival = time.monotonic()
                if len(frames) != 3:
                    continue
                self._receive(decode_seq(frames[1]), frames[2])
        except BaseException as exc:  # surfaced through `error`, never lost
            if not self._stop.is_set():
                self._error = exc

    def _receive(self, seq: int, payload: bytes) -> None:
        verdict = self._tracker.classify(seq)
        if verdict == "duplicate":
            return
        if verdict == "gap":
            first, last = self._tracker.missing_before(seq)  # type: ignore[misc]
            for rseq, rpayload in self._replay(first):
                if first <= rseq <= last and self._tracker.classify(rseq) == "next":
                    self._apply(rseq, rpayload)
            if self._tracker.next_seq <= last:
                with self._lock:
                    self._tracker.give_up(self._tracker.next_seq, last)
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        batch = decode_batch(payload)
        with self._lock:
            self._events.extend(batch_to_events(batch, len(self._events) + 1))
            self._cleared += sum(isinstance(e, AllBlocksCleared) for e in batch.events)
            self._batches += 1
            self._tracker.applied(seq)

    def _replay(self, start_seq: int) -> list[tuple[int, bytes]]:
        """Ask the ROUTER for batches from `start_seq`; [] if there is no replay socket
        or it does not answer in time."""
        if not self.replay_endpoint:
            return []
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        got: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.replay_endpoint)
            sock.send_multipart([b"", encode_seq(start_seq)])
            deadline = time.monotonic() + self.replay_timeout
            while time.monotonic() < deadline:
                if not sock.poll(50):
                    continue
                frames = sock.recv_multipart()  # [b"", topic, seq, payload]
                if len(frames) < 4:
                    continue
                seq = decode_seq(frames[2])
                if seq == END_OF_REPLAY:
                    break
                got.append((seq, frames[3]))
        finally:
            sock.close(linger=0)
        return got
