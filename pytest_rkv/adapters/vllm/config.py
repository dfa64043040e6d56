"""The adapter's settings, read from vLLM's own `--additional-config '{"rkv": {...}}'`.

Both processes see the same value: the engine core reads `vllm_config.additional_config`,
the API server reads `args.additional_config`. Unknown keys are an error at start-up, so a
typo cannot silently leave a default in force.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from pytest_rkv.adapters.vllm import CONFIG_KEY


@dataclass(frozen=True)
class AdapterConfig:
    # What all live claims may hold together, in blocks. None: 80% of the usable pool
    # (64 of 80 in the canonical geometry, as in the reference runtime).
    claim_budget_blocks: int | None = None
    # Offer POST /v1/kv/faults (test-only: arms a failure of the next materialization).
    fault_injection: bool = False
    # The event log keeps at most this many events (oldest dropped first).
    max_events: int = 100_000
    # How long POST /v1/kv/claims waits for the materializing prefill.
    materialize_timeout_s: float = 120.0
    # How long any other claim operation waits for the engine thread.
    call_timeout_s: float = 30.0
    # The KV connector vLLM was started with (`--kv-transfer-config`) is a host tier that
    # stores every computed block and loads it back (LMCache's `LMCacheMPConnector`, with
    # its chunk size equal to vLLM's block size): demotable hard claims are then demoted to
    # it under pressure instead of refusing, and restored before reuse. Off: no demotion.
    host_tier: bool = False
    # With tenants (RKV_TOKENS in the API server's environment): what one tenant's claims
    # may hold together, in blocks (None: only the global budget binds).
    tenant_budget_blocks: int | None = None
    # In a routed deployment (`dynamo+rkv`): this engine's worker name. Claim and
    # claim-request ids then start with it, so they stay unique across workers, and
    # claims, reuse records and events name it. None: a single engine.
    worker: str | None = None

    @classmethod
    def from_additional_config(cls, additional: Any) -> AdapterConfig:
        if isinstance(additional, str):
            additional = json.loads(additional) if additional.strip() else {}
        if not isinstance(additional, dict):
            return cls()
        raw = additional.get(CONFIG_KEY) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"--additional-config {CONFIG_KEY!r} must be an object, got {raw!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(
                f"--additional-config {CONFIG_KEY!r}: unknown key(s) {unknown}; known: {sorted(known)}"
            )
        cfg = cls(**raw)
        if cfg.claim_budget_blocks is not None and cfg.claim_budget_blocks < 0:
            raise ValueError("claim_budget_blocks must be >= 0")
        return cfg

    def budget_for(self, usable_blocks: int) -> int:
        if self.claim_budget_blocks is not None:
            return self.claim_budget_blocks
        return (usable_blocks * 4) // 5
