"""The lowering checker: descriptor + anchors + run evidence -> labels, with reasons.

It answers one question per obligation: what does the evidence actually support for the
lowering a descriptor proposes? It uses the label rules of `pytest_rkv.label` and can only
*lower* what they give: with run evidence, no obligation gets more than the run's own label
(`obligation_label` on the run's outcomes), nor more than the descriptor proposes; without
run evidence, nothing above approximation substrate. A positive proposal that a bearing test
contradicts becomes *rejected mapping*. docs/lowering.md states the rules in prose.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pytest_rkv.contract import CORE_OBLIGATIONS, OBLIGATIONS, OBLIGATIONS_BY_ID, Event, EventType, Label, TestOutcome
from pytest_rkv.descriptor import (
    LABEL_OF_PROPOSAL,
    LOWERING_PROBES,
    STATIC_KINDS,
    Descriptor,
    DescriptorError,
    Evidence,
    Lowering,
    SuiteCatalogue,
    parse_anchor,
    parse_descriptor,
    related_substrates,
    resolve_anchor,
    suite_key,
)
from pytest_rkv.evidence import ROW_SCHEMA, events_digest
from pytest_rkv.label import Verdict, combine, obligation_label
from pytest_rkv.trace import order_problems

# ======================================================================================
# The lowering checker: descriptor + anchors + run evidence -> labels, with reasons
# ======================================================================================
#
# The checker answers one question per obligation: what does the evidence actually support
# for the lowering this descriptor proposes? It is fail-closed in three ways:
#
# * it never gives more than `obligation_label` gives for the run's outcomes, nor more than
#   the descriptor proposes, nor more than approximation without run evidence;
# * a positive label (native or adapter) also needs anchors and a trace that binds the
#   behaviour to a claim: the required lifecycle events, naming the claim, in an order
#   that is unambiguous and matches the row's fingerprint of the trace;
# * a positive proposal that a bearing test contradicts is a *rejected mapping*, whatever
#   the descriptor cites (bearing tests are found from the suite, not from the anchors).
#
# Monotonicity: removing an anchor or a piece of evidence can only move a label down the
# order unknown < approximation < {adapter < native, rejected}. Rejected and native are
# both conclusions that need evidence; losing evidence loses them, and can never create one.


_RANK = {Label.UNKNOWN: 0, Label.APPROXIMATION: 1, Label.ADAPTER: 2, Label.NATIVE: 3}
_POSITIVE = (Label.NATIVE, Label.ADAPTER)

# Why a label is what it is. Every finding has one of these codes and a plain sentence.
FINDING_CODES: dict[str, str] = {
    "confirmed": "run evidence confirms the proposal",
    "contradicted": "a test that bears on the proposal failed",
    "harness-error": "a bearing test errored or did not run: its evidence is void",
    "unconfirmed": "the run did not show the obligation",
    "static-only": "anchors but no run evidence",
    "anchors-unresolved": "an anchor points nowhere, or at something that does not bear on it",
    "not-proposed": "the descriptor proposes no lowering for it",
    "capped-by-proposal": "the descriptor proposes less than the run shows",
    "depth-overclaim": "the descriptor claims a deeper lowering than the run had",
    "no-claim-support": "the backend ran at depth none",
    "missing-identity": "the evidence names no claim",
    "missing-event": "a required lifecycle event is absent",
    "missing-order": "no trace, a trace that does not match the row, a seq gap or a broken lifecycle",
    "ambiguous-order": "events without seq, duplicate seq, or equal timestamps and no seq",
    "fallback-recompute": "blocks were recomputed, not restored or claimed",
    "generic-counters": "only counters, which name no claim",
    "storage-only": "blocks moved between tiers, no claim was demoted or restored",
    "bad-evidence": "row.json or events.jsonl is not usable",
    "bad-descriptor": "the descriptor is malformed",
    "not-applicable": "the obligation does not apply to this runtime",
    "capped-by-run": "the run's own label for the obligation is lower; the checker never raises it",
}


@dataclass(frozen=True)
class Finding:
    code: str
    text: str


@dataclass(frozen=True)
class ObligationCheck:
    obligation: str
    label: Label | None  # None: not applicable
    proposed: Label | None  # None: no lowering proposed
    surface: str | None
    findings: tuple[Finding, ...]

    @property
    def codes(self) -> tuple[str, ...]:
        return tuple(f.code for f in self.findings)

    @property
    def reason(self) -> str:
        return "; ".join(f.text for f in self.findings)


@dataclass(frozen=True)
class RowCheck:
    name: str
    backend: str
    runtime: str
    version: str
    label: Label
    findings: tuple[Finding, ...]
    obligations: dict[str, ObligationCheck]
    evidence: str  # "run" or "static"
    source: str = ""

    @property
    def reason(self) -> str:
        return "; ".join(f.text for f in self.findings)

    @property
    def malformed(self) -> bool:
        return any(f.code == "bad-descriptor" for f in self.findings)


# What the trace must show, per obligation, before a pass can count as native or adapter:
# every group (any-of event types) present, naming a claim when `named`; and, when
# `ordered`, each bearing test's trace well ordered.
@dataclass(frozen=True)
class _Needs:
    groups: tuple[frozenset[str], ...]
    named: bool = True
    ordered: bool = False


def _g(*types: EventType) -> frozenset[str]:
    return frozenset(t.value for t in types)


_E = EventType
TRACE_NEEDS: dict[str, _Needs] = {
    "claim-identity": _Needs((_g(_E.CLAIM_ACCEPTED),)),
    "materialization-predicate": _Needs((_g(_E.CLAIM_MATERIALIZED),)),
    "ordered-lifecycle": _Needs((_g(_E.CLAIM_ACCEPTED), _g(_E.CLAIM_MATERIALIZED)), ordered=True),
    "active-refusal": _Needs((_g(_E.REQUEST_REFUSED),)),
    "soft-harm": _Needs((_g(_E.CLAIM_HARMED),)),
    "write-no-admit": _Needs((_g(_E.CLAIM_REFUSED),), named=False),
    "materialization-failure": _Needs((_g(_E.CLAIM_MATERIALIZATION_FAILED, _E.CLAIM_RESTORE_FAILED),), ordered=True),
    "demotion-restore": _Needs((_g(_E.CLAIM_DEMOTED), _g(_E.CLAIM_RESTORED)), ordered=True),
    "expiry": _Needs((_g(_E.CLAIM_EXPIRED),)),
    "release": _Needs((_g(_E.CLAIM_RELEASED),)),
    "reuse-attribution": _Needs((_g(_E.CLAIM_REUSED),)),
    "trace-reconstruction": _Needs((_g(_E.CLAIM_ACCEPTED),), ordered=True),
    "placement": _Needs((_g(_E.CLAIM_REUSED),)),
    "claim-isolation": _Needs((_g(_E.CLAIM_ACCEPTED),)),
}
# Obligations where blocks stored again after their eviction mean "recomputed".
_RECOMPUTE_SENSITIVE = frozenset({"materialization-failure", "demotion-restore", "reuse-attribution",
                                  "materialization-predicate"})
_COUNTER_KEY = re.compile(r"(metric|_total$|cached_tokens|hit_rate|hits$|num_reused|counter)", re.IGNORECASE)


def _cap(label: Label, cap: Label) -> Label:
    return label if _RANK[label] <= _RANK[cap] else cap


def _short(text: object, limit: int = 160) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# -- run evidence, read defensively --------------------------------------------------------


@dataclass(frozen=True)
class _Test:
    nodeid: str
    outcome: TestOutcome
    entry: dict  # the row's test entry (detail, evidence, events, events_sha256)


@dataclass
class _Run:
    depth: str
    routed: bool
    sections: dict[str, dict[str, list[_Test]]]  # "obligations"/"substrates"/"lowerings" -> id -> tests
    trace: dict[str, list] | None  # nodeid -> raw events, None: no trace file

    def keys(self) -> set[str]:
        return {suite_key(t.nodeid) for sec in self.sections.values() for tests in sec.values() for t in tests}


def _read_run(evidence: Evidence) -> tuple[_Run | None, list[str]]:
    """The row as the checker needs it, or None with the reasons it is unusable."""
    row, problems = evidence.row, list(evidence.problems)
    if row is None:
        return None, problems
    if not isinstance(row, dict) or row.get("schema") != ROW_SCHEMA:
        return None, problems + [f"row.json is not a {ROW_SCHEMA} document"]
    depth = row.get("depth")
    if depth not in ("native", "adapter", "patch", "none"):
        return None, problems + [f"row.json has no valid depth (got {_short(depth, 40)!r})"]
    sections: dict[str, dict[str, list[_Test]]] = {}
    for name in ("obligations", "substrates", "lowerings"):
        raw = row.get(name, {})
        if not isinstance(raw, dict):
            return None, problems + [f"row.json {name} is not a table"]
        sections[name] = {}
        for id_, sec in raw.items():
            tests = sec.get("tests") if isinstance(sec, dict) else None
            if not isinstance(tests, list):
                return None, problems + [f"row.json {name}.{id_} has no test list"]
            parsed = []
            for t in tests:
                if not (isinstance(t, dict) and isinstance(t.get("nodeid"), str)
                        and isinstance(t.get("outcome"), str) and t["outcome"] in TestOutcome._value2member_map_):
                    return None, problems + [f"row.json {name}.{id_} holds a malformed test entry"]
                parsed.append(_Test(t["nodeid"], TestOutcome(t["outcome"]), t))
            sections[name][str(id_)] = parsed
    trace, trace_problems = None, []
    if evidence.trace is not None:
        trace = {}
        for item in evidence.trace:
            if isinstance(item, dict) and isinstance(item.get("test"), str):
                trace.setdefault(item["test"], []).append(item)
            else:
                trace_problems.append("events.jsonl holds lines that are not events of a test (ignored: "
                                      "no test's fingerprint can include them)")
    return _Run(depth, bool(row.get("routed", False)), sections, trace), problems + sorted(set(trace_problems))


# -- the trace checks ----------------------------------------------------------------------


def _digest(events: list[dict]) -> str:
    """The row's fingerprint of a test's events (the trace lines without their `test` key)."""
    return events_digest([{k: v for k, v in e.items() if k != "test"} for e in events])


def _matches_row(test: _Test, events: list) -> str | None:
    """None if the trace of `test` is the one the row fingerprinted; else why not."""
    count, digest = test.entry.get("events"), test.entry.get("events_sha256")
    name = suite_key(test.nodeid)
    if not isinstance(count, int) or isinstance(count, bool):
        return f"the row does not fingerprint the events of {name}, so its trace cannot be trusted"
    if len(events) != count:
        return f"the row recorded {count} events for {name} but events.jsonl holds {len(events)}"
    if count and digest != _digest(events):
        return f"the events of {name} in events.jsonl differ from the ones the row fingerprinted"
    return None


def _order_findings(name: str, events: list[dict]) -> list[Finding]:
    """Ambiguity, gaps and lifecycle-order problems of one test's trace."""
    seqs = [e.get("seq") for e in events]
    unnumbered = [e for e, s in zip(events, seqs) if not isinstance(s, int) or isinstance(s, bool)]
    if unnumbered:
        most = max(Counter(repr(e.get("ts")) for e in unnumbered).values())
        tie = f", {most} of them sharing a timestamp" if most > 1 else ""
        return [Finding("ambiguous-order", f"ambiguous order: {len(unnumbered)} events of {name} carry no seq{tie}, "
                                           "so nothing fixes their order")]
    dupes = sorted({s for s in seqs if seqs.count(s) > 1})
    if dupes:
        return [Finding("ambiguous-order", f"ambiguous order: seq {dupes[0]} appears more than once in {name}")]
    try:
        parsed = [Event.model_validate({k: v for k, v in e.items() if k != "test"}) for e in events]
    except Exception as exc:  # pydantic ValidationError, or anything a fuzzed line provokes
        return [Finding("missing-order", f"missing order: an event of {name} is not a contract event "
                                         f"({_short(exc, 80)})")]
    for a, b in zip(parsed, parsed[1:]):
        if b.seq > a.seq + 1:
            return [Finding("missing-order", f"missing order: the trace of {name} jumps from seq {a.seq} "
                                             f"to {b.seq}; events are missing")]
    problems = order_problems(parsed)
    if problems:
        return [Finding("missing-order", f"missing order in {name}: {problems[0]}")]
    return []


def _type(e: dict) -> str | None:
    return e.get("type") if isinstance(e.get("type"), str) else None


def _names_claim(e: dict) -> bool:
    return bool(e.get("claim_id")) or bool(e.get("blocking_claims"))


def _recomputed(events: list[dict]) -> bool:
    """A block hash evicted and then stored again in the same test: a recompute."""
    evicted: set = set()
    for e in events:
        hashes = e.get("block_hashes") if isinstance(e.get("block_hashes"), list) else []
        hashes = {h for h in hashes if isinstance(h, (str, int))}
        if _type(e) == EventType.BLOCKS_EVICTED.value:
            evicted |= hashes
        elif _type(e) == EventType.BLOCKS_STORED.value and hashes & evicted:
            return True
    return False


def _diagnose(ob_id: str, missing: list[frozenset[str]], per_test: dict[str, list[dict]],
              tests: list[_Test], surface_kind: str | None) -> Finding:
    """Name *why* the required claim events are absent, in the vocabulary of the paper."""
    wanted = " or ".join(sorted(missing[0]))
    names = ", ".join(sorted(per_test))
    events = [e for evs in per_test.values() for e in evs]
    if surface_kind == "host-offload" or any(e.get("tier") == "host" for e in events):
        return Finding("storage-only", f"storage-only evidence: blocks moved between tiers in {names}, but no "
                                       f"{wanted} event names a claim")
    if ob_id in _RECOMPUTE_SENSITIVE and any(_recomputed(evs) for evs in per_test.values()):
        return Finding("fallback-recompute", f"fallback recompute: blocks evicted in {names} were stored again "
                                             f"(recomputed) and no {wanted} event names a claim")
    counters = surface_kind == "counter" or any(
        isinstance(t.entry.get("evidence"), dict) and any(_COUNTER_KEY.search(str(k)) for k in t.entry["evidence"])
        for t in tests)
    if counters and not any(_names_claim(e) for e in events):
        return Finding("generic-counters", f"generic counters: the evidence of {names} counts reuse or hits but "
                                           f"names no claim (no {wanted} event)")
    if any(_names_claim(e) for e in events):
        return Finding("missing-event", f"missing lifecycle event: the trace of {names} names claims but shows "
                                        f"no {wanted} event for one")
    return Finding("missing-identity", f"missing identity: nothing in the trace of {names} names a claim "
                                       f"(no {wanted} event with a claim id); the events name blocks or requests only")


def _trace_findings(ob_id: str, tests: list[_Test], run: _Run, surface_kind: str | None) -> list[Finding]:
    """Everything the trace lacks before a pass of `ob_id` can bind to a claim; [] if nothing."""
    needs = TRACE_NEEDS[ob_id]
    names = ", ".join(sorted(suite_key(t.nodeid) for t in tests)) or "its tests"
    code = "missing-order" if needs.ordered else "missing-identity"
    if run.trace is None:
        return [Finding(code, f"{code.replace('-', ' ')}: there is no event trace (events.jsonl) for {names}")]
    findings: list[Finding] = []
    per_test: dict[str, list[dict]] = {}
    for t in tests:
        events = run.trace.get(t.nodeid, [])
        mismatch = _matches_row(t, events)
        if mismatch:
            findings.append(Finding("missing-order", f"missing order: {mismatch}"))
            continue
        per_test[suite_key(t.nodeid)] = events
        if needs.ordered:
            findings += _order_findings(suite_key(t.nodeid), events)
    if not per_test:
        return findings
    union = [e for evs in per_test.values() for e in evs]
    missing = [g for g in needs.groups
               if not any(_type(e) in g and (_names_claim(e) or not needs.named) for e in union)]
    if missing:
        findings.append(_diagnose(ob_id, missing, per_test, tests, surface_kind))
    return findings


# -- bearing tests and anchors -------------------------------------------------------------


@dataclass
class _Context:
    descriptor: Descriptor
    catalogue: SuiteCatalogue
    run: _Run | None
    source_root: Path | None

    def surface_kind(self, low: Lowering | None) -> str | None:
        if low is None or low.surface is None:
            return None
        return self.descriptor.surfaces[low.surface].kind

    def bearing(self, ob_id: str, surface_kind: str | None) -> list[_Test]:
        """Every test that bears on this proposal: the obligation's own tests, and the probes
        of this obligation through this kind of surface. A test the suite (or an anchor)
        expects but the row lacks counts as not run."""
        assert self.run is not None
        groups: list[tuple[list[_Test], list[str]]] = [
            (self.run.sections["obligations"].get(ob_id, []), self.catalogue.keys_for("obligation", ob_id))]
        for probe_id, probe in sorted(LOWERING_PROBES.items()):
            if probe.obligation == ob_id and probe.surface_kind == surface_kind:
                groups.append((self.run.sections["lowerings"].get(probe_id, []),
                               self.catalogue.keys_for("lowering", probe_id)))
        bearing: list[_Test] = []
        for present, expected in groups:
            bearing += present
            have = {suite_key(t.nodeid) for t in present}
            bearing += [_Test(k, TestOutcome.NOT_RUN, {}) for k in expected if k not in have]
        return bearing

    def anchor_support(self, ob_id: str, low: Lowering | None) -> tuple[bool, bool, list[Finding]]:
        """(a static anchor resolves, a run anchor that bears on it resolves, findings).

        The lowering's own anchors must bear on the obligation: a test anchor must be one of
        its tests (or a probe of it, or a test of one of its substrates), a probe anchor must
        probe it. The surface's anchors describe the surface and only need to resolve."""
        if low is None:
            return False, False, []
        row_keys = self.run.keys() if self.run else set()
        own = set(self.catalogue.keys_for("obligation", ob_id))
        if self.run:
            own |= {suite_key(t.nodeid) for t in self.run.sections["obligations"].get(ob_id, [])}
        probes = {k for pid, p in LOWERING_PROBES.items() if p.obligation == ob_id
                  for k in self.catalogue.keys_for("lowering", pid)}
        substrate_tests = {k for s in related_substrates(ob_id) for k in self.catalogue.keys_for("substrate", s)}
        surface_anchors = self.descriptor.surfaces[low.surface].anchors if low.surface else []
        static_ok = backing_ok = False
        findings: list[Finding] = []
        for text, on_surface in [(t, False) for t in low.anchors] + [(t, True) for t in surface_anchors]:
            anchor = parse_anchor(text)
            problem = resolve_anchor(anchor, self.descriptor, self.catalogue, row_keys, self.source_root)
            if problem:
                findings.append(Finding("anchors-unresolved", f"anchor points nowhere: {problem}"))
            elif anchor.kind in STATIC_KINDS:
                static_ok = True
            elif on_surface:
                continue
            elif anchor.kind == "test" and suite_key(anchor.target) in own | probes:
                backing_ok = True
            elif anchor.kind == "lowering" and getattr(LOWERING_PROBES.get(anchor.target), "obligation", None) == ob_id:
                backing_ok = True
            elif not (anchor.kind == "test" and suite_key(anchor.target) in substrate_tests):
                findings.append(Finding("anchors-unresolved", f"anchor does not bear on it: {anchor} does not "
                                                              f"{'test' if anchor.kind == 'test' else 'probe'} {ob_id}"))
        return static_ok, backing_ok, findings


# -- one obligation ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Proposal:
    """One obligation's proposed lowering, with what its anchors support."""

    ob_id: str
    low: Lowering | None
    proposed: Label | None  # None: nothing proposed
    kind: str | None  # the surface's kind
    static_ok: bool  # a source, doc or event anchor resolves
    backing_ok: bool  # a test or probe anchor that bears on the obligation resolves

    @property
    def cap(self) -> Label:
        """Never more than proposed; an obligation with no lowering at most approximation."""
        return self.proposed if self.proposed is not None else Label.APPROXIMATION

    @property
    def positive(self) -> bool:
        return self.proposed in _POSITIVE

    @property
    def floor(self) -> Label:
        """What the anchors alone support."""
        return Label.APPROXIMATION if self.static_ok else Label.UNKNOWN


Judgement = tuple[Label | None, list[Finding]]


def _check_obligation(ob_id: str, low: Lowering | None, ctx: _Context) -> ObligationCheck:
    proposed = LABEL_OF_PROPOSAL[low.proposed] if low else None
    surface = low.surface if low else None
    routed = ctx.descriptor.routed or bool(ctx.run and ctx.run.routed)
    if OBLIGATIONS_BY_ID[ob_id].routed_only and not routed:
        why = Finding("not-applicable", "does not apply: the runtime is not routed")
        return ObligationCheck(ob_id, None, proposed, surface, (why,))
    static_ok, backing_ok, anchor_findings = ctx.anchor_support(ob_id, low)
    p = _Proposal(ob_id, low, proposed, ctx.surface_kind(low), static_ok, backing_ok)
    if low is None and ctx.run is None:
        label, findings = Label.UNKNOWN, [Finding("not-proposed", "no lowering proposed, and no run evidence")]
    elif ctx.run is None:
        label, findings = _judge_static(p)
    else:
        label, findings = _judge_run(p, ctx.run, ctx)
        if low is None:
            findings.append(Finding("not-proposed", "no lowering proposed; only the run's substrates can speak for it"))
        earned = run_label(ob_id, ctx.run, ctx.catalogue.keys_for("obligation", ob_id))
        if label in _RANK and earned in _RANK and _RANK[label] > _RANK[earned]:
            findings.append(Finding("capped-by-run", f"capped at the run's own label, {earned.value}"))
            label = earned
    return ObligationCheck(ob_id, label, proposed, surface, tuple(findings + anchor_findings))


def run_label(ob_id: str, run: _Run, expected: Iterable[str] = ()) -> Label | None:
    """The label the run itself earned for the obligation (the row's rule, `obligation_label`).
    A test the suite expects (`expected`, suite keys) but the row lacks counts as not run,
    exactly as `bearing` counts it: dropping a record never earns more than keeping it."""
    tests = run.sections["obligations"].get(ob_id, [])
    have = {suite_key(t.nodeid) for t in tests}
    outcome = combine([*(t.outcome for t in tests), *(TestOutcome.NOT_RUN for k in expected if k not in have)])
    passed = {k for k, tests in run.sections["substrates"].items()
              if combine(t.outcome for t in tests) == TestOutcome.PASSED}
    return obligation_label(ob_id, outcome, run.depth, passed).label


def _judge_static(p: _Proposal) -> Judgement:
    """No run: the anchors can show a surface exists, never that it carries the obligation."""
    if p.static_ok:
        why = Finding("static-only", "static anchors only: they show the surface exists, but with no run "
                                     "evidence nothing shows it carries the obligation")
    else:
        why = Finding("anchors-unresolved", "no run evidence and no anchor that resolves: nothing supports it")
    return _static_label(p.floor, p.cap), [why]


def _judge_run(p: _Proposal, run: _Run, ctx: _Context) -> Judgement:
    """A run: contradiction first, then void evidence, then what the outcomes support."""
    bearing = ctx.bearing(p.ob_id, p.kind)
    failed = _contradicting(bearing)
    if p.positive and failed:
        return Label.REJECTED, [Finding("contradicted", f"contradicted: {suite_key(t.nodeid)} failed" + (
            f" ({_short(t.entry['detail'])})" if t.entry.get("detail") else "")) for t in failed]
    combined = combine(t.outcome for t in bearing)
    if combined == TestOutcome.NOT_APPLICABLE:
        return None, [Finding("not-applicable", "does not apply to this backend (its tests say so)")]
    if combined in (TestOutcome.ERROR, TestOutcome.NOT_RUN):
        void = sorted(suite_key(t.nodeid) for t in bearing if t.outcome in (TestOutcome.ERROR, TestOutcome.NOT_RUN))
        return _cap(p.floor, p.cap), [Finding("harness-error", f"harness error or not run: {', '.join(void)}; that "
                                                               "evidence is void, so only the anchors count")]
    suite = obligation_label(p.ob_id, combined, run.depth, _substrates_passed(ctx))
    if suite.label in _POSITIVE:
        return _judge_pass(p, suite, [t for t in bearing if t.outcome == TestOutcome.PASSED], run)
    if suite.label == Label.APPROXIMATION and combined == TestOutcome.PASSED:
        return _cap(suite.label, p.cap), [Finding("no-claim-support", f"{suite.reason} (depth {run.depth})")]
    # The anchors' floor may stand in for a probe that could not run, never above what the
    # run itself earned for the obligation (`_check_obligation` caps at `run_label`).
    label = suite.label if _RANK[suite.label] >= _RANK[p.floor] else p.floor
    findings = [Finding("unconfirmed", f"the run does not show it: {combined.value} ({suite.reason})")]
    if p.positive:  # name what the trace lacks, to say why the proposal does not hold
        findings += [f for f in _trace_findings(p.ob_id, bearing, run, p.kind) if f.code != "missing-order"][:1]
    return _cap(label, p.cap), findings


def _judge_pass(p: _Proposal, suite: Verdict, passed: list[_Test], run: _Run) -> Judgement:
    """The outcomes say native or adapter. Credit it only for a positive, anchored proposal
    whose trace binds the pass to a claim; and never deeper than the run was."""
    if not p.positive:
        return _cap(suite.label, p.cap), [Finding("capped-by-proposal", f"the run passed it ({suite.reason}), "
                                                                         f"but the descriptor proposes only {p.cap.value}")]
    if not (p.static_ok or p.backing_ok):
        return Label.APPROXIMATION, [Finding("anchors-unresolved", "the run passed it, but no anchor of the "
                                                                   "lowering resolves, so it is not tied to a surface")]
    problems = _trace_findings(p.ob_id, passed, run, p.kind)
    if problems:
        return _cap(Label.APPROXIMATION, p.cap), problems
    label = _cap(suite.label, p.cap)
    if p.proposed == Label.NATIVE and label == Label.ADAPTER:
        return label, [Finding("depth-overclaim", f"depth overclaim: the descriptor claims native, but the evidence "
                                                  f"comes from a run at depth {run.depth}: {suite.reason}")]
    bound = "a well-ordered trace" if TRACE_NEEDS[p.ob_id].ordered else "the trace"
    return label, [Finding("confirmed", f"confirmed: {suite.reason}; anchored, and the evidence names the claim "
                                        f"in {bound}")]


def _static_label(floor: Label, cap: Label) -> Label:
    """Without run evidence: what the anchors support (approximation at most), within the proposal."""
    return _cap(floor, cap)


def _contradicting(bearing: list[_Test]) -> list[_Test]:
    """The bearing tests that contradict a positive proposal: every failed one."""
    return [t for t in bearing if t.outcome == TestOutcome.FAILED]


def _substrates_passed(ctx: _Context) -> set[str]:
    """Substrates whose tests all passed, every expected test present."""
    assert ctx.run is not None
    passed = set()
    for sub_id, tests in ctx.run.sections["substrates"].items():
        have = {suite_key(t.nodeid) for t in tests}
        missing = [k for k in ctx.catalogue.keys_for("substrate", sub_id) if k not in have]
        if tests and not missing and combine(t.outcome for t in tests) == TestOutcome.PASSED:
            passed.add(sub_id)
    return passed


# -- one row -------------------------------------------------------------------------------


def lowering_row_label(checks: Mapping[str, ObligationCheck],
                       unsupported: frozenset[str] = frozenset()) -> tuple[Label, Finding]:
    """The row from its obligations: any rejected mapping rejects the row; otherwise native
    or adapter only if every applicable obligation is; approximation if anything positive.

    As in `row_label`, an adapter row may bound its scope: obligations the descriptor does
    not propose positively *and* the run declared unsupported lie outside it, never a core
    obligation. `unsupported` holds the obligations the run declared unsupported."""
    counted = {k: c for k, c in checks.items() if c.label is not None}
    rejected = sorted(k for k, c in counted.items() if c.label == Label.REJECTED)
    if rejected:
        return Label.REJECTED, Finding("contradicted", f"rejected mapping for: {', '.join(rejected)}")
    if not counted:
        return Label.UNKNOWN, Finding("not-applicable", "no applicable obligation")
    labels = {c.label for c in counted.values()}
    if labels == {Label.NATIVE}:
        return Label.NATIVE, Finding("confirmed", "every applicable obligation is native conformance")
    if labels <= set(_POSITIVE):
        adapted = sorted(k for k, c in counted.items() if c.label == Label.ADAPTER)
        return Label.ADAPTER, Finding("confirmed", f"every obligation is supported; through an adapter: "
                                                   f"{', '.join(adapted)}")
    missing = sorted(k for k, c in counted.items() if c.label not in _POSITIVE)
    outside = [k for k in missing if k in unsupported and checks[k].proposed not in _POSITIVE]
    inside = {k: c for k, c in counted.items() if k not in outside}
    if (outside == missing and Label.ADAPTER in {c.label for c in inside.values()}
            and not set(CORE_OBLIGATIONS) & set(outside)):
        return Label.ADAPTER, Finding("confirmed", f"every obligation in the adapter's scope is supported; "
                                                   f"declared unsupported, outside it: {', '.join(outside)}")
    if labels & {Label.NATIVE, Label.ADAPTER, Label.APPROXIMATION}:
        return Label.APPROXIMATION, Finding("unconfirmed", f"substrates present, obligations missing: "
                                                           f"{', '.join(missing)}")
    return Label.UNKNOWN, Finding("unconfirmed", f"nothing supports: {', '.join(missing)}")


def check_lowering(descriptor: Descriptor, evidence: Evidence | None = None, *,
                   catalogue: SuiteCatalogue | None = None, source_root: Path | None = None,
                   name: str | None = None, source: str = "") -> RowCheck:
    """Label every obligation of one descriptor, and its row, from anchors and evidence."""
    evidence = evidence or Evidence()
    catalogue = catalogue if catalogue is not None else SuiteCatalogue.default()
    run, problems = _read_run(evidence)
    ctx = _Context(descriptor, catalogue, run, source_root)
    checks = {ob.id: _check_obligation(ob.id, descriptor.lowerings.get(ob.id), ctx) for ob in OBLIGATIONS}
    unsupported = frozenset(
        ob_id for ob_id, entry in (evidence.row or {}).get("obligations", {}).items()
        if isinstance(entry, dict) and entry.get("outcome") == "unsupported"
    ) if run is not None else frozenset()
    label, finding = lowering_row_label(checks, unsupported)
    findings = [finding] + [Finding("bad-evidence", f"evidence ignored: {p}") for p in problems]
    if run is None:
        findings.append(Finding("static-only", "no run evidence: nothing above approximation substrate"))
    return RowCheck(name or descriptor.row_name(), descriptor.backend, descriptor.runtime.name,
                    descriptor.runtime.version, label, tuple(findings), checks,
                    "run" if run is not None else "static", source)


def check_data(descriptor_data: object, evidence: Evidence | None = None, *,
               catalogue: SuiteCatalogue | None = None, source: str = "<descriptor>") -> RowCheck:
    """Like `check_lowering`, from unvalidated data: a malformed descriptor gives an unknown
    row whose one finding is the validation error (never an exception)."""
    try:
        descriptor = parse_descriptor(descriptor_data, source)
    except DescriptorError as exc:
        return malformed_row(source, exc)
    return check_lowering(descriptor, evidence, catalogue=catalogue, source=source)


def malformed_row(source: str, error: DescriptorError) -> RowCheck:
    name = Path(source).stem if source else "?"
    return RowCheck(name, "?", "?", "?", Label.UNKNOWN, (Finding("bad-descriptor", str(error)),), {}, "static", source)


def check_file(path: Path | str, evidence: Evidence | None = None, *, evidence_dir: Path | str | None = None,
               catalogue: SuiteCatalogue | None = None, source_root: Path | None = None) -> RowCheck:
    """Check one descriptor file. A malformed file gives a malformed row (one-line reason).
    Without explicit `evidence`, `<evidence_dir>/<backend>/row.json` is used when present."""
    from pytest_rkv.descriptor import evidence_for, load_descriptor

    try:
        descriptor = load_descriptor(path)
    except DescriptorError as exc:
        return malformed_row(str(path), exc)
    if evidence is None:
        evidence = evidence_for(descriptor, evidence_dir)
    return check_lowering(descriptor, evidence, catalogue=catalogue, source_root=source_root,
                          name=descriptor.row_name(Path(path)), source=str(path))
