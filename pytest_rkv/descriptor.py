"""Lowering descriptors: what a runtime row *proposes*, and where each proposal is anchored.

A descriptor (one TOML or JSON file per row under `backends/<runtime>/`) names a runtime
at a pinned version, the surfaces it offers (request priority, TTL, host offload, block
events, routing, connector hooks, ...) and, per obligation, the proposed lowering: which
surface carries it, at which depth, with which label, and the anchors that back it.

A descriptor is a claim, not evidence. The checker (`pytest_rkv.label.check_lowering`)
decides what the anchors and the run evidence actually support. This module only:

* validates descriptors (`load_descriptor`), turning every problem into one line that
  names the file, the field and what was expected (`DescriptorError`);
* parses anchors (`Anchor`), the five kinds a proposal may point at;
* knows the suite (`SuiteCatalogue`): which test backs which obligation, so a test anchor
  can be resolved and a missing test noticed;
* reads evidence files (`load_row`, `load_trace`) without ever raising on bad content.

`python -m pytest_rkv.descriptor` prints the JSON Schema committed as
`docs/descriptor.schema.json`.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, model_validator

from pytest_rkv.contract import OBLIGATIONS_BY_ID, SUBSTRATES_BY_ID, Depth, EventType, Label

DESCRIPTOR_SCHEMA = "pytest-rkv/descriptor/1"

# --------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------

ANCHOR_KINDS = ("source", "doc", "test", "lowering", "event")
STATIC_KINDS = frozenset({"source", "doc", "event"})  # say the surface exists, not that it works
RUN_KINDS = frozenset({"test", "lowering"})  # point at suite evidence that can confirm or contradict

_ANCHOR_SHAPES = {
    # source:PATH[@PIN][#SYMBOL]  (a file in the runtime's repository; PIN overrides runtime.commit)
    "source": re.compile(r"^(?P<path>[A-Za-z0-9_][\w.+-]*(/[\w.+-]+)*)(@(?P<pin>[\w.+=-]+))?(#(?P<symbol>[\w.:<>-]+))?$"),
    "doc": re.compile(r"^https?://[A-Za-z0-9.-]+\.[A-Za-z]{2,}(:\d+)?(/\S*)?$"),
    "test": re.compile(r"^[\w./-]*test_\w*\.py::test_\w+$"),
    "lowering": re.compile(r"^[a-z0-9][a-z0-9-]*$"),
    "event": re.compile(r"^[A-Za-z][\w.]*$"),
}
_ANCHOR_HELP = {
    "source": "source:PATH[@PIN][#SYMBOL] with a relative path",
    "doc": "doc:https://host/path",
    "test": "test:suites/test_FILE.py::test_NAME",
    "lowering": "lowering:PROBE-ID",
    "event": "event:EventTypeName",
}
_MOVING_REFS = frozenset({"main", "master", "head", "latest", "trunk", "develop", "dev", "nightly"})


@dataclass(frozen=True)
class Anchor:
    """One parsed anchor. `target` is what follows `kind:`; for sources, `path`, `pin`
    (a per-anchor pin, else the descriptor's `runtime.commit`) and `symbol` are split out."""

    kind: str
    target: str
    path: str | None = None
    pin: str | None = None
    symbol: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.target}"


def parse_anchor(text: str) -> Anchor:
    """`kind:target` -> Anchor, or ValueError saying what shape was expected."""
    kind, sep, target = str(text).partition(":")
    if not sep or kind not in _ANCHOR_SHAPES:
        raise ValueError(f"expected KIND:TARGET with KIND one of {', '.join(ANCHOR_KINDS)}")
    match = _ANCHOR_SHAPES[kind].match(target)
    if not match or (kind == "source" and ".." in target.split("@")[0].split("/")):
        raise ValueError(f"expected {_ANCHOR_HELP[kind]}")
    if kind != "source":
        return Anchor(kind, target)
    pin = match.group("pin")
    if pin is not None and pin.lower() in _MOVING_REFS:
        raise ValueError(f"@{pin} is a moving branch, not a pin; use a commit or release tag")
    return Anchor(kind, target, path=match.group("path"), pin=pin, symbol=match.group("symbol"))


def _check_anchor(text: str) -> str:
    parse_anchor(text)
    return text


AnchorText = Annotated[
    str,
    AfterValidator(_check_anchor),
    WithJsonSchema({
        "type": "string",
        "pattern": r"^(source|doc|test|lowering|event):\S+$",
        "description": "KIND:TARGET. source:PATH[@PIN][#SYMBOL] (file in the runtime's repository "
                       "at runtime.commit or PIN), doc:URL, test:suites/FILE.py::TEST, "
                       "lowering:PROBE-ID, event:EventTypeName.",
    }),
]

# --------------------------------------------------------------------------------------
# The descriptor model
# --------------------------------------------------------------------------------------

SurfaceKind = Literal[
    "claim-api",  # an accepted-claim API (RKV API v1 or equivalent)
    "lifecycle-events",  # claim lifecycle events
    "block-events",  # block-level cache events (stored / removed)
    "prefix-cache",  # automatic prefix caching
    "request-priority",  # a scheduling priority on requests
    "retention-priority",  # a per-block or per-range eviction priority
    "eviction-policy",  # a selectable eviction order (lru, lfu, priority, ...)
    "ttl",  # a duration after which something reverts or is dropped
    "host-offload",  # a slower tier blocks can move to and back from
    "session-lock",  # a session that pins its prefix while open
    "no-evict-mode",  # a scheduler mode that never evicts a running request's blocks
    "kv-aware-routing",  # a router scoring workers by cached overlap
    "placement-hint",  # a way to see or force which worker serves a request
    "connector-hook",  # a plugin interface into the cache manager or scheduler
    "scheduler-hook",  # a replaceable scheduler
    "load-failure-path",  # what happens when loading KV fails
    "hint-envelope",  # a carrier for per-request KV hints
    "admission-control",  # request admission limits
    "counter",  # metrics and per-request usage counters
]
ProposedLabel = Literal[
    "native conformance", "adapter-scoped evidence", "approximation substrate", "unknown evidence"
]
ObligationId = Literal[tuple(OBLIGATIONS_BY_ID)]  # type: ignore[valid-type]
SurfaceId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]*$")]
# A commit SHA, a release tag (v0.5.23) or a pinned package (sglang==0.5.23).
Pin = Annotated[str, Field(pattern=r"^([0-9a-f]{7,40}|v?\d[\w.+-]*|[A-Za-z0-9_.-]+==[\w.+-]+)$")]


class _Strict(BaseModel):
    # A descriptor is reviewed by people: a misspelt field must be an error, not ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class Runtime(_Strict):
    name: str = Field(min_length=1, description="the runtime, as its project names it")
    version: str = Field(min_length=1, description="the version the anchors were read at")
    commit: Pin | None = Field(
        default=None,
        description="commit SHA, release tag or pinned package the source anchors were read "
                    "from; leave it out when unknown (then only anchors with their own @PIN count)")
    source: str | None = Field(default=None, pattern=r"^https?://\S+$", description="repository URL")


class Surface(_Strict):
    kind: SurfaceKind
    summary: str = Field(min_length=1, description="what the surface does, in one sentence")
    anchors: list[AnchorText] = Field(default_factory=list)
    emits: list[Annotated[str, Field(pattern=r"^[A-Za-z][\w.]*$")]] = Field(
        default_factory=list, description="event types this surface publishes (for event: anchors)")


class Lowering(_Strict):
    surface: SurfaceId | None = Field(default=None, description="id of the declared surface that carries the obligation; leave it out for none")
    depth: Depth = Field(description="native (the runtime), adapter (a plugin), patch (a modified runtime), none")
    proposed: ProposedLabel = Field(description="the label the descriptor claims; the checker decides")
    anchors: list[AnchorText] = Field(default_factory=list)
    note: str = ""

    @model_validator(mode="after")
    def _label_fits_depth(self) -> Lowering:
        needs = {"native conformance": ("native",), "adapter-scoped evidence": ("adapter", "patch")}
        if self.proposed in needs and self.depth not in needs[self.proposed]:
            raise ValueError(f"proposed {self.proposed!r} needs depth {' or '.join(needs[self.proposed])}, "
                             f"got {self.depth!r}")
        if self.surface is None and self.depth != "none":
            raise ValueError(f"depth {self.depth!r} needs a surface that carries it")
        return self


class Descriptor(_Strict):
    schema_: Literal["pytest-rkv/descriptor/1"] = Field(alias="schema")
    name: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]*$",
                             description="row name; defaults to the file name without extension")
    backend: str = Field(min_length=1, description="the --rkv-backend whose bundle is this row's evidence")
    summary: str = ""
    routed: bool = Field(default=False, description="a routed multi-worker runtime (placement applies)")
    runtime: Runtime
    surfaces: dict[SurfaceId, Surface] = Field(default_factory=dict)
    lowerings: dict[ObligationId, Lowering] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              title="pytest-rkv lowering descriptor")

    @model_validator(mode="after")
    def _surfaces_exist(self) -> Descriptor:
        for ob_id, low in self.lowerings.items():
            if low.surface is not None and low.surface not in self.surfaces:
                known = ", ".join(sorted(self.surfaces)) or "none declared"
                raise ValueError(f"lowerings.{ob_id}.surface: {low.surface!r} is not a declared surface ({known})")
        return self

    def row_name(self, path: Path | None = None) -> str:
        return self.name or (path.stem if path else self.backend)


def descriptor_schema() -> dict:
    return Descriptor.model_json_schema(by_alias=True)


def schema_text() -> str:
    return json.dumps(descriptor_schema(), indent=2, sort_keys=True) + "\n"


# --------------------------------------------------------------------------------------
# Loading, with one clear line per problem
# --------------------------------------------------------------------------------------


class DescriptorError(ValueError):
    """A descriptor that cannot be used. `str()` is one line: file, field, expectation."""

    def __init__(self, path: str, field_: str, message: str, more: int = 0) -> None:
        self.path, self.field, self.message, self.more = path, field_, message, more
        extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        where = f"{field_}: " if field_ else ""
        super().__init__(f"{path}: {where}{message}{extra}")


def _field_path(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after",) and not str(p).startswith("function-"))


_PATTERN_HELP = {
    r"^[a-z0-9][a-z0-9-]*$": "a lowercase id (letters, digits, dashes)",
    r"^[a-z0-9][a-z0-9._-]*$": "a lowercase name (letters, digits, '.', '_', '-')",
    r"^([0-9a-f]{7,40}|v?\d[\w.+-]*|[A-Za-z0-9_.-]+==[\w.+-]+)$":
        "a commit SHA, a release tag (v1.2.3) or a pinned package (name==1.2.3), not a branch",
    r"^https?://\S+$": "an http(s) URL",
    r"^[A-Za-z][\w.]*$": "an event type name",
}


def _explain(err: dict) -> tuple[str, str]:
    """A pydantic error as (field path, 'expected ..., got ...')."""
    loc = _field_path(tuple(err.get("loc", ())))
    kind, msg = err.get("type", ""), err.get("msg", "")
    got = err.get("input")
    shown = json.dumps(got, default=str) if not isinstance(got, dict) else "a table"
    if len(shown) > 60:
        shown = shown[:57] + "..."
    pattern = err.get("ctx", {}).get("pattern")
    expected = _PATTERN_HELP.get(pattern, f"a string matching {pattern}") if pattern else None
    if loc.endswith(".[key]"):  # a key of a table (an obligation or surface id) is wrong
        loc = loc.removesuffix(".[key]")
        return loc, f"{shown} is not allowed as a key here: expected {expected or msg.removeprefix('Input should be ')}"
    if kind == "missing":
        return loc, "required field is missing"
    if kind == "extra_forbidden":
        return loc, "unknown field (not part of the descriptor format; check its spelling)"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        if isinstance(got, dict):  # raised by a model-level check: the message says it all
            if ": " in msg and msg.split(": ", 1)[0].startswith("lowerings."):
                loc, msg = msg.split(": ", 1)
            return loc, msg
        return loc, f"{msg}, got {shown}"
    if kind == "literal_error":
        return loc, f"expected {msg.removeprefix('Input should be ')}, got {shown}"
    if kind == "string_pattern_mismatch":
        return loc, f"expected {expected}, got {shown}"
    return loc, f"{msg[:1].lower()}{msg[1:]}, got {shown}"


def parse_descriptor(data: Any, source: str = "<descriptor>") -> Descriptor:
    """Validate already-parsed data; DescriptorError on the first problem."""
    if not isinstance(data, dict):
        raise DescriptorError(source, "", f"expected a table of fields at top level, got {type(data).__name__}")
    try:
        return Descriptor.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        field_, message = _explain(errors[0])
        raise DescriptorError(source, field_, message, len(errors) - 1) from None


def load_descriptor(path: Path | str) -> Descriptor:
    """Read and validate one descriptor file (.toml or .json)."""
    path = Path(path)
    shown = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DescriptorError(shown, "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DescriptorError(shown, "", f"cannot read it: {exc}") from None
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise DescriptorError(shown, "", "expected a .toml or .json file")
    except json.JSONDecodeError as exc:
        raise DescriptorError(shown, "", f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except tomllib.TOMLDecodeError as exc:
        raise DescriptorError(shown, "", f"not valid TOML: {exc}") from None
    return parse_descriptor(data, shown)


def descriptor_files(root: Path | str) -> list[Path]:
    """Every descriptor under `root` (or `root` itself), in a stable order."""
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.suffix in (".toml", ".json") and p.is_file())


# --------------------------------------------------------------------------------------
# The suite, as far as anchors need it
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A lowering probe: which obligation it tests, through which kind of surface. A failed
    probe contradicts every positive proposal of that obligation on that kind of surface,
    whether or not the descriptor cites it (a descriptor cannot hide a probe by omission)."""

    obligation: str
    surface_kind: str


# Every rkv_lowering probe in suites/ must be listed here (tests/checker/test_descriptor.py checks it).
LOWERING_PROBES: dict[str, Probe] = {
    "priority-as-hard-claim": Probe("active-refusal", "request-priority"),
    "kv-routing-as-placement": Probe("placement", "kv-aware-routing"),
    "streaming-session-as-hard-claim": Probe("active-refusal", "session-lock"),
    "host-tier-as-demotion": Probe("demotion-restore", "host-offload"),
    "host-tier-as-hard-claim": Probe("active-refusal", "host-offload"),
}


def suite_key(nodeid: str) -> str:
    """`suites/test_x.py::test_y[backend]` -> `test_x.py::test_y`: how rows and anchors meet."""
    path, _, name = nodeid.partition("::")
    return f"{path.rsplit('/', 1)[-1]}::{name.split('[', 1)[0]}"


@dataclass(frozen=True)
class SuiteCatalogue:
    """Which suite test bears on which obligation, substrate or lowering probe.

    Read from the suite's own markers (`rkv_obligation`, `rkv_substrate`, `rkv_lowering`)
    with `ast`, without importing or running anything."""

    tests: dict[str, tuple[str, str]] = field(default_factory=dict)  # test key -> (kind, id)

    @classmethod
    def scan(cls, suite_dir: Path | str) -> SuiteCatalogue:
        tests: dict[str, tuple[str, str]] = {}
        for path in sorted(Path(suite_dir).glob("test_*.py")):
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (OSError, SyntaxError, UnicodeDecodeError):
                continue
            for node in tree.body:
                if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                    subject = _marker_subject(node)
                    if subject:
                        tests[f"{path.name}::{node.name}"] = subject
        return cls(tests)

    @classmethod
    def default(cls) -> SuiteCatalogue:
        """The released suite (installed with the package)."""
        from pytest_rkv.locations import suite_dir

        return cls.scan(suite_dir())

    def keys_for(self, kind: str, id_: str) -> list[str]:
        return sorted(k for k, v in self.tests.items() if v == (kind, id_))

    def lowering_ids(self) -> set[str]:
        return {id_ for kind, id_ in self.tests.values() if kind == "lowering"}

    def probe_obligations(self, suite_dir: Path | str) -> dict[str, str]:
        """lowering id -> obligation, as the suite's markers state it (for the probe table test)."""
        found: dict[str, str] = {}
        for path in sorted(Path(suite_dir).glob("test_*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and _call_name(node) == "rkv_lowering" and len(node.args) >= 2:
                    a, b = node.args[:2]
                    if isinstance(a, ast.Constant) and isinstance(b, ast.Constant):
                        found[str(a.value)] = str(b.value)
        return found


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def _marker_subject(node: ast.FunctionDef) -> tuple[str, str] | None:
    for deco in node.decorator_list:
        if isinstance(deco, ast.Call) and deco.args and isinstance(deco.args[0], ast.Constant):
            name = _call_name(deco)
            if name in ("rkv_obligation", "rkv_substrate", "rkv_lowering"):
                return name.removeprefix("rkv_"), str(deco.args[0].value)
    return None


def resolve_anchor(anchor: Anchor, descriptor: Descriptor, catalogue: SuiteCatalogue,
                   row_tests: set[str], source_root: Path | None = None) -> str | None:
    """None if the anchor resolves; else a sentence saying where it points instead.

    Resolution is offline and conservative: a source anchor needs a pin (and, given a
    `source_root` checkout, an existing file); a test or probe must exist in the suite or
    the run; an event type must be a contract event or one a declared surface emits."""
    if anchor.kind == "source":
        pin = anchor.pin or descriptor.runtime.commit
        if not pin:
            return f"{anchor} is not pinned: the descriptor has no runtime.commit and the anchor no @PIN"
        if source_root is not None and anchor.pin is None and not (source_root / anchor.path).is_file():
            return f"{anchor} names a file that does not exist under {source_root}"
        return None
    if anchor.kind == "doc":
        return None
    if anchor.kind == "test":
        key = suite_key(anchor.target)
        if key in catalogue.tests or key in row_tests:
            return None
        return f"{anchor} names no test of this suite"
    if anchor.kind == "lowering":
        if anchor.target in LOWERING_PROBES or anchor.target in catalogue.lowering_ids():
            return None
        return f"{anchor} names no lowering probe of this suite"
    emitted = {e for s in descriptor.surfaces.values() for e in s.emits}
    if anchor.target in emitted or anchor.target in {t.value for t in EventType}:
        return None
    return f"{anchor} is neither a contract event nor one a declared surface emits"


# --------------------------------------------------------------------------------------
# Evidence files (never raise on content: bad evidence is a finding, not a crash)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    """What a run left for one row: its `row.json` (parsed JSON or None) and its trace
    (`events.jsonl` lines as parsed objects, None if absent), plus any reading problem."""

    row: Any = None
    trace: list[Any] | None = None
    row_path: str | None = None
    trace_path: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def has_run(self) -> bool:
        return self.row is not None


def load_evidence(row_path: Path | str | None, trace_path: Path | str | None = None) -> Evidence:
    """Read a row and (if given, or lying beside the row as events.jsonl) its trace."""
    problems: list[str] = []
    row = None
    if row_path is not None:
        try:
            row = json.loads(Path(row_path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            problems.append(f"{row_path}: no such file")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"{row_path}: not readable as JSON ({exc})")
        if trace_path is None and (Path(row_path).parent / "events.jsonl").is_file():
            trace_path = Path(row_path).parent / "events.jsonl"
    trace = None
    if trace_path is not None:
        try:
            lines = Path(trace_path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{trace_path}: not readable ({exc})")
        else:
            trace = []
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    trace.append(json.loads(line))
                except json.JSONDecodeError:
                    problems.append(f"{trace_path}:{number}: not a JSON object")
                    trace.append(None)  # kept as a hole: that test's trace is unreadable
    return Evidence(row, trace, str(row_path) if row_path else None,
                    str(trace_path) if trace_path else None, tuple(problems))


def evidence_for(descriptor: Descriptor, evidence_dir: Path | str | None) -> Evidence:
    """The bundle of the descriptor's backend in `evidence_dir` (row.json + events.jsonl),
    if there is one, else no evidence."""
    if evidence_dir is None:
        return Evidence()
    directory = Path(evidence_dir) / descriptor.backend  # the canonical id names the bundle folder
    if (directory / "row.json").is_file():
        return load_evidence(directory / "row.json")
    return Evidence()


def related_substrates(obligation_id: str) -> tuple[str, ...]:
    return tuple(s for s in OBLIGATIONS_BY_ID[obligation_id].substrates if s in SUBSTRATES_BY_ID)


LABEL_OF_PROPOSAL: dict[str, Label] = {label.value: label for label in Label}


if __name__ == "__main__":
    print(schema_text(), end="")
