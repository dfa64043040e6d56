"""A block-level KV pool with prefix caching and no model: the reference runtime's memory.

Layout of one prompt of T tokens at block size B:

    | block 0 | block 1 | ... | block k-1 | partial |
      h0        h1=H(h0,..)     h(k-1)      (never cached)

Each full block is named by a hash chained to its parent, so equal hashes mean equal
prefixes. A block is in exactly one of these places:

* free        - holds nothing;
* cached      - holds reusable KV; evictable; kept in LRU order (`_lru`, oldest first);
* referenced  - used by a running request (`ref > 0`) or pinned by a hard claim;
                never evictable.

Soft-claimed blocks stay in the LRU but are taken only after every unclaimed block.
The pool knows nothing about claims beyond the `holders` set on each block; the runtime
decides what a holder means and reports events.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field


def block_hashes(token_ids: list[int], block_size: int, salt: str | None = None) -> list[str]:
    """Chained hashes of the full blocks of a prompt (the partial tail has none).

    A `salt` (the tenant) seeds the chain, as vLLM's `cache_salt` does: equal prompts of
    different tenants get different hashes, so they never share (or reveal) cached blocks."""
    hashes: list[str] = []
    parent = "rkv-root" if salt is None else f"rkv-root|{salt}"
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        chunk = ",".join(map(str, token_ids[start : start + block_size]))
        parent = hashlib.sha256(f"{parent}|{chunk}".encode()).hexdigest()[:16]
        hashes.append(parent)
    return hashes


@dataclass
class Block:
    block_id: int
    hash: str | None = None
    ref: int = 0  # running requests using it
    hard_holders: set[str] = field(default_factory=set)  # claim ids pinning it
    soft_holders: set[str] = field(default_factory=set)  # claim ids that would be harmed

    @property
    def evictable(self) -> bool:
        return self.hash is not None and self.ref == 0 and not self.hard_holders


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"pool needs positive sizes, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks))
        self._by_hash: dict[str, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable cached blocks

    # -- queries ---------------------------------------------------------------------
    def lookup(self, hashes: list[str]) -> list[int]:
        """Block ids of the longest cached prefix of `hashes`."""
        found: list[int] = []
        for h in hashes:
            block_id = self._by_hash.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def num_free(self) -> int:
        return len(self._free)

    def evictable(self, exclude: set[int] = frozenset()) -> tuple[list[int], list[int]]:
        """(unclaimed, soft-claimed) evictable block ids, each in eviction order."""
        unclaimed = [b for b in self._lru if b not in exclude and not self.blocks[b].soft_holders]
        soft = [b for b in self._lru if b not in exclude and self.blocks[b].soft_holders]
        return unclaimed, soft

    def cached_unclaimed(self) -> int:
        return sum(1 for b in self._lru if not self.blocks[b].soft_holders)

    def active(self) -> int:
        return sum(1 for b in self.blocks if b.ref > 0)

    # -- changes ---------------------------------------------------------------------
    def touch(self, block_ids: list[int]) -> None:
        """A running request starts using these cached blocks."""
        for b in block_ids:
            self.blocks[b].ref += 1
            self._lru.pop(b, None)

    def evict(self, block_id: int) -> str:
        """Drop a cached block's content and return its hash. Caller checked evictable."""
        block = self.blocks[block_id]
        assert block.evictable, f"block {block_id} is not evictable: {block}"
        self._lru.pop(block_id, None)
        old_hash = block.hash
        assert old_hash is not None
        del self._by_hash[old_hash]
        block.hash = None
        block.soft_holders.clear()
        self._free.append(block_id)
        return old_hash

    def allocate(self, n: int) -> list[int]:
        """Take n free blocks for a running request. Caller evicted enough first."""
        if n > len(self._free):
            raise ValueError(f"allocate({n}) with only {len(self._free)} free blocks")
        taken, self._free = self._free[:n], self._free[n:]
        for b in taken:
            self.blocks[b].ref = 1
        return taken

    def store(self, block_id: int, block_hash: str) -> bool:
        """Name a block's content so later prompts can reuse it. False if already cached."""
        if block_hash in self._by_hash:
            return False
        self.blocks[block_id].hash = block_hash
        self._by_hash[block_hash] = block_id
        return True

    def release(self, block_ids: list[int]) -> None:
        """A request finished. Freed in reverse order, so a prefix's tail is evicted first
        (the same order vLLM uses, which keeps the probes comparable)."""
        for b in reversed(block_ids):
            block = self.blocks[b]
            block.ref -= 1
            if block.ref > 0:
                continue
            if block.hash is None:
                self._free.append(b)
            elif not block.hard_holders:
                self._lru[b] = None  # most recently used last

    def pin(self, block_ids: list[int], claim_id: str, hard: bool) -> None:
        for b in block_ids:
            block = self.blocks[b]
            (block.hard_holders if hard else block.soft_holders).add(claim_id)
            if hard:
                self._lru.pop(b, None)

    def unpin(self, claim_id: str) -> None:
        for block in self.blocks:
            block.soft_holders.discard(claim_id)
            if claim_id in block.hard_holders:
                block.hard_holders.discard(claim_id)
                if block.evictable:
                    self._lru[block.block_id] = None

    def held_by(self, claim_id: str) -> list[int]:
        return [
            b.block_id
            for b in self.blocks
            if claim_id in b.hard_holders or claim_id in b.soft_holders
        ]

    def drop_claim_blocks(self, claim_id: str, keep: set[int] = frozenset()) -> list[str]:
        """Demotion: unpin a claim and drop its blocks from the device, except those in
        `keep` (a running request is about to reuse them); return the dropped hashes."""
        ids = self.held_by(claim_id)
        self.unpin(claim_id)
        return [self.evict(b) for b in ids if b not in keep and self.blocks[b].evictable]
