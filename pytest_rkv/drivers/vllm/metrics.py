"""Read vLLM's Prometheus `/metrics` page.

Two views of the same text:

* `parse_samples` keeps every sample with its labels. The driver reads the pool
  geometry from it (`vllm:cache_config_info` carries `num_gpu_blocks` and
  `block_size` as labels; it is vLLM's own statement of the pool it built).
* `metrics_dict` is the flat `name{labels} -> value` map the suites record as
  evidence. It keeps only `vllm:` series, drops the `*_created` timestamps and
  histogram buckets (noise for a conformance row), and drops the `engine` and
  `model_name` labels, summing over them, so a key reads the same on every run
  and every engine count: `vllm:num_requests_waiting_by_reason{reason="capacity"}`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

# Labels that identify *which* engine/model/process spoke, not *what* was measured
# (`pid`: SGLang labels its series with the scheduler's process id).
IDENTITY_LABELS = frozenset({"engine", "model_name", "pid"})

# Series the suites and the driver read by name (documented here so a rename in a
# future vLLM shows up in one place).
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits_total"
PREEMPTIONS = "vllm:num_preemptions_total"
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"
REQUESTS_RUNNING = "vllm:num_requests_running"
REQUESTS_WAITING = "vllm:num_requests_waiting"
WAITING_BY_REASON = "vllm:num_requests_waiting_by_reason"
CACHE_CONFIG_INFO = "vllm:cache_config_info"

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,)?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


class MetricsParseError(ValueError):
    """A line of the exposition text is not valid Prometheus text format."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    value: float = 0.0


def _unescape(text: str) -> str:
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], text)


def _parse_value(text: str) -> float:
    lowered = text.lower()
    if lowered in ("+inf", "inf"):
        return math.inf
    if lowered == "-inf":
        return -math.inf
    return float(text)  # float("NaN") works


def parse_line(line: str) -> Sample | None:
    """One exposition line -> Sample; None for blank lines and comments."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    name_match = _NAME.match(line)
    if not name_match:
        raise MetricsParseError(f"no metric name in {line!r}")
    name, rest = name_match.group(0), line[name_match.end():]
    labels: dict[str, str] = {}
    if rest.startswith("{"):
        pos = 1
        while True:
            if rest[pos:].lstrip().startswith("}"):
                pos = rest.index("}", pos) + 1
                break
            label = _LABEL.match(rest, pos)
            if not label:
                raise MetricsParseError(f"bad label set in {line!r}")
            labels[label.group(1)] = _unescape(label.group(2))
            pos = label.end()
            if not label.group(3) and not rest[pos:].lstrip().startswith("}"):
                raise MetricsParseError(f"missing ',' between labels in {line!r}")
        rest = rest[pos:]
    fields = rest.split()
    if not fields:
        raise MetricsParseError(f"no value in {line!r}")
    try:
        value = _parse_value(fields[0])  # a trailing timestamp, if any, is ignored
    except ValueError:
        raise MetricsParseError(f"bad value {fields[0]!r} in {line!r}") from None
    return Sample(name, labels, value)


def parse_samples(text: str) -> list[Sample]:
    return [s for s in map(parse_line, text.splitlines()) if s is not None]


def sample_key(name: str, labels: dict[str, str]) -> str:
    """`name{a="x",b="y"}` with labels sorted, or just `name` when there are none."""
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def metrics_dict(text: str, prefix: str = "vllm:") -> dict[str, float]:
    """The flat evidence view described in the module docstring (`prefix`: the runtime's
    series, e.g. "sglang:" for SGLang's page, which has the same text format)."""
    out: dict[str, float] = {}
    for sample in parse_samples(text):
        if not sample.name.startswith(prefix):
            continue
        if sample.name.endswith(("_created", "_bucket")) or sample.name == CACHE_CONFIG_INFO:
            continue
        labels = {k: v for k, v in sample.labels.items() if k not in IDENTITY_LABELS}
        key = sample_key(sample.name, labels)
        out[key] = out.get(key, 0.0) + sample.value
    return out


def cache_config(samples: list[Sample]) -> dict[str, str] | None:
    """The labels of `vllm:cache_config_info` (engine 0 if there are several)."""
    infos = [s for s in samples if s.name == CACHE_CONFIG_INFO]
    if not infos:
        return None
    infos.sort(key=lambda s: s.labels.get("engine", ""))
    return dict(infos[0].labels)


def waiting_by_reason(metrics: dict[str, float], reason: str) -> float:
    return metrics.get(sample_key(WAITING_BY_REASON, {"reason": reason}), 0.0)
