"""Out-of-tree adapters that give an unmodified serving runtime the RKV API v1 semantics.

An adapter is code that runs *inside* a runtime's own processes through the runtime's
public extension points, never a fork or a patch of its sources. Whatever passes through
an adapter is labelled *adapter-scoped evidence*, never native conformance.

* `pytest_rkv.adapters.vllm`: stock vLLM (a scheduler subclass loaded with
  `--scheduler-cls`, plus an endpoint plugin for the HTTP routes). See docs/vllm-adapter.md.
"""
