"""The configurations compared, and the order they run in.

A configuration = a backend (a name in `pytest_rkv.drivers.registry.BACKENDS`, started by
that backend's own driver, so the benchmark uses the suite's launchers and supervisor and
leaves no server behind) + how the agents hold their context across tool pauses. Adding one
is one entry in `CONFIGURATIONS`; configurations whose backend is not registered yet are
listed in `PENDING` and reported as such.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.agentic.client import ClaimPolicy

BASELINE = "stock"
# The same vLLM + adapter server with agents that claim nothing: segments of it sit next to
# the claims segments (no server restart in between), so the ratios against it are paired
# in time and much less exposed to the shared machine's load swings than those against
# the stock server, which is a different start at the ends of the run.
SAME_SERVER_BASELINE = "rkv-no-claims"


@dataclass(frozen=True)
class Configuration:
    name: str
    backend: str
    claim: ClaimPolicy | None
    description: str


def configurations(ttl_s: float) -> dict[str, Configuration]:
    return {c.name: c for c in (
        Configuration(BASELINE, "vllm", None, "stock vLLM: prefix caching, LRU eviction, no retention"),
        Configuration(SAME_SERVER_BASELINE, "vllm+rkv", None,
                      "vLLM + RKV adapter loaded, agents hold no claims (requests through the "
                      "adapter's route): the same-server baseline"),
        Configuration("rkv-hard-ttl", "vllm+rkv", ClaimPolicy("hard", ttl_s=ttl_s),
                      f"vLLM + RKV adapter: each agent holds a hard claim (TTL {ttl_s:g} s) on its "
                      "context across every tool pause"),
        Configuration("rkv-soft", "vllm+rkv", ClaimPolicy("soft"),
                      "vLLM + RKV adapter: each agent holds a soft claim (yields to admissions, "
                      "reported as harmed) across every tool pause"),
    )}


# Named here so the README and the JSON say what is missing, and why.
PENDING: dict[str, str] = {
    "lmcache": "stock vLLM + LMCache CPU tier: the backend exists (`vllm+lmcache`); the "
               "configuration is not wired into this benchmark yet",
    "rkv-demotable-lmcache": "vLLM + RKV adapter with demotable claims on LMCache: the backend "
                             "exists (`vllm+rkv+lmcache`); the configuration (a demotable claim "
                             "policy) is not wired into this benchmark yet",
}


def schedule(order: list[Configuration], repeats: int) -> list[tuple[str, list[str]]]:
    """(backend, [configuration, ...]) groups, one server start per group.

    Repeats alternate forward and backward over the configurations (ABBA...), so every
    configuration's segments are centred on the same moment of the run and a linear drift
    of the machine's load cancels; configurations of one backend sit next to each other so
    consecutive segments share a server (at most one server is up at a time)."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    flat: list[Configuration] = []
    for r in range(repeats):
        flat.extend(order if r % 2 == 0 else list(reversed(order)))
    groups: list[tuple[str, list[str]]] = []
    for config in flat:
        if groups and groups[-1][0] == config.backend:
            groups[-1][1].append(config.name)
        else:
            groups.append((config.backend, [config.name]))
    return groups


def ordered(wanted: list[str], known: dict[str, Configuration]) -> list[Configuration]:
    """The chosen configurations, grouped by backend (first appearance order)."""
    unknown = [w for w in wanted if w not in known]
    if unknown:
        pending = [u for u in unknown if u in PENDING]
        if pending:
            raise ValueError(f"configuration(s) {', '.join(pending)} not available yet: "
                             + "; ".join(PENDING[p] for p in pending))
        raise ValueError(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(known)}")
    chosen = [known[w] for w in dict.fromkeys(wanted)]
    backends = list(dict.fromkeys(c.backend for c in chosen))
    return [c for b in backends for c in chosen if c.backend == b]
