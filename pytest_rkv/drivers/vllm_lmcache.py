"""`vllm+lmcache`: stock vLLM with LMCache as its CPU tier (no claims).

Two supervised servers: LMCache's MP cache server first, then vLLM exactly as the `vllm`
backend starts it plus `--kv-transfer-config` naming `LMCacheMPConnector` (see
`drivers/vllm/lmcache.py`). After vLLM is ready the driver checks, from LMCache's own
`/status`, that vLLM's connector registered its KV caches with the tier: a row whose
tier never attached would measure stock vLLM under another name.

The row stays depth "none": nothing names a claim. What the tier adds is substrate
evidence (host-tier stores in vLLM's KV events, a displaced prefix served again from the
tier) and two lowering probes (`suites/test_lowerings.py`) the checker judges from the
run. `reset` empties vLLM's prefix cache *and* the tier, so no test inherits another's
prompts from host memory.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar

from pytest_rkv.contract import Depth
from pytest_rkv.drivers.process import ManagedProcess
from pytest_rkv.drivers.vllm import build as build_mod
from pytest_rkv.drivers.vllm import lmcache as tier_mod
from pytest_rkv.drivers.vllm import server as server_mod
from pytest_rkv.drivers.vllm.driver import VllmDriver
from pytest_rkv.errors import ServerStartError

ATTACH_TIMEOUT = 60.0  # the connector registers with the tier while vLLM warms up


class LmcacheTier:
    """Mixin for a vLLM driver: start LMCache's server before vLLM, attach vLLM to it,
    verify the attachment, empty it on reset, stop it after vLLM.

    Placed before the vLLM driver class in the bases, so `start` wraps the driver's own."""

    tier: ManagedProcess | None = None
    tier_plan: tier_mod.TierPlan | None = None
    tier_client: tier_mod.TierClient | None = None
    lmcache_version: str | None = None
    tier_instances: list | None = None
    tier_startup_seconds: float | None = None
    tier_chunk_is_block: bool = False  # LMCache's chunk = vLLM's block (the claims adapter's predicate)

    def start(self) -> None:
        self.lmcache_version = tier_mod.require_installed()
        workdir = Path(self.settings.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        self.tier_plan = tier_mod.plan_tier(
            workdir=workdir, zmq_port=server_mod.free_port(), http_port=server_mod.free_port(),
            base_env=self._server_base_env(), marker_env=server_mod.MARKER_ENV,
            chunk_tokens=self._tier_block_size() if self.tier_chunk_is_block else None,
        )
        began = time.monotonic()
        self.tier = tier_mod.launch(self.tier_plan, timeout=self.settings.startup_timeout)
        self.tier_startup_seconds = round(time.monotonic() - began, 1)
        try:
            self.tier_client = tier_mod.TierClient(self.tier_plan, self.http)
            self.extra_server_args = (*tier_mod.connector_args(self.tier_plan), *self.extra_server_args)
            super().start()
            self.tier_instances = self._wait_attached()
        except BaseException:
            self.stop()
            raise

    def _tier_block_size(self) -> int:
        """vLLM's block size as the driver will choose it (before vLLM's start sets it)."""
        return self.settings.block_size or build_mod.detect().default_block_size

    def _wait_attached(self) -> list:
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while True:
            instances = tier_mod.attached_instances(self.tier_client.status())
            if instances:
                return instances
            self.check_alive()
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"vLLM is ready but its LMCache connector did not register with the tier "
                    f"within {ATTACH_TIMEOUT:.0f}s (LMCache /status lists no instance)",
                    log_tail=self.log_tail(),
                )
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            tier, self.tier = self.tier, None
            if tier is not None:
                tier.stop()

    def check_alive(self) -> None:
        super().check_alive()
        if self.tier is not None:
            self.tier.check_alive()

    def log_tail(self, lines: int = 40) -> str:
        own = super().log_tail(lines)
        if self.tier is None:
            return own
        return f"{own}\n--- {tier_mod.LOG_NAME} ---\n{self.tier.log_tail(lines // 2)}"

    def reset(self) -> None:
        super().reset()
        if self.tier_client is not None:
            self.tier_client.clear()

    def tier_status(self) -> dict:
        """LMCache's `/status` (objects held, sessions, instances), recorded as evidence."""
        self._require_started()
        return tier_mod.tier_usage(self.tier_client.status())

    def describe(self) -> dict:
        facts = super().describe()
        facts.update({
            "tier": "lmcache",
            "lmcache_version": self.lmcache_version,
            "tier_connector": f"{tier_mod.CONNECTOR_MODULE}:{tier_mod.CONNECTOR}",
            "tier_server_argv": list(self.tier_plan.argv) if self.tier_plan else None,
            "tier_attached_instances": self.tier_instances,
            "tier_startup_seconds": self.tier_startup_seconds,
        })
        return facts


class VllmLmcacheDriver(LmcacheTier, VllmDriver):
    name: ClassVar[str] = "vllm+lmcache"
    depth: ClassVar[Depth] = "none"
    requires = (*VllmDriver.requires, "lmcache")
