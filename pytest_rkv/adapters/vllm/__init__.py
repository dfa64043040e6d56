"""The RKV API v1 adapter for stock vLLM (v1 engine), loaded without forking vLLM.

Three pieces, each through a public vLLM extension point (docs/vllm-adapter.md explains
why this is the smallest combination that gives the semantics):

* `scheduler.RkvScheduler` (`--scheduler-cls`): a subclass of vLLM's own `Scheduler` that
  owns the claim book (`claims.ClaimCore`). It pins claimed blocks with the block pool's
  reference counts, refuses an admission that fits only by evicting a hard claim, lets
  soft claims yield with an attributed harm event, attributes reuse, and carries each
  request's outcome back in the engine output's `kv_transfer_params`.
* `scheduler.install_engine_hook`: adds one method, `EngineCore.rkv_call`, so claim
  operations reach the scheduler as ordinary engine *utility calls* (processed by the
  engine thread between steps, so nothing races the scheduler).
* `endpoints.RkvEndpointPlugin` (`vllm.endpoint_plugins` entry point named `rkv`): the
  RKV API v1 routes on the API server and a `/v1/completions` override that adds the
  `rkv` record and turns a refusal into HTTP 409 `active_refusal`.

Enable with (the backend `vllm+rkv` does this):

    VLLM_PLUGINS=rkv python -m vllm.entrypoints.openai.api_server ... \\
        --scheduler-cls pytest_rkv.adapters.vllm.scheduler.RkvScheduler \\
        --additional-config '{"rkv": {"claim_budget_blocks": 64, "fault_injection": true}}'

Nothing here is imported unless vLLM loads it, so pytest-rkv keeps working without vLLM.
"""

ADAPTER_VERSION = "0.1.0"
PLUGIN_NAME = "rkv"  # the entry point name, and what VLLM_PLUGINS must list
SCHEDULER_CLS = "pytest_rkv.adapters.vllm.scheduler.RkvScheduler"
ENGINE_METHOD = "rkv_call"  # the utility method installed on vLLM's EngineCore
CONFIG_KEY = "rkv"  # the key under --additional-config
