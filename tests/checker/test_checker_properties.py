"""Properties of the lowering checker (hypothesis, bounded so CI stays fast).

* Monotonicity: removing an anchor or a piece of evidence never raises a label. Labels are
  ordered unknown < approximation < {adapter < native, rejected}: native and rejected are
  both conclusions that need evidence, so losing evidence may lose them but never create one.
  Pieces of evidence: a test record, a whole substrate or probe entry, the row, the trace,
  one test's trace, one event line.
* Order: permuting the events of a test (and re-fingerprinting the row, as if the runtime
  had really served them so) never lets an order-sensitive obligation pass.
* The checker is deterministic and total: arbitrary descriptors, rows and traces give a
  result, never an exception; a malformed descriptor gives unknown with the reason.

The generated rows start from a real reference run (the bundle committed with the
adapter-claims-native counterexample), so positive labels are reachable, then vary depth,
outcomes and anchors.
"""

import copy
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_rkv.contract import OBLIGATIONS, Label
from pytest_rkv.descriptor import Evidence, SuiteCatalogue, parse_descriptor, suite_key
from pytest_rkv.checker import TRACE_NEEDS, check_data, check_lowering
from pytest_rkv.evidence import events_digest
from tests.conftest import recorded_catalogue

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = Path(__file__).resolve().parent / "bad_lowerings" / "adapter-claims-native"
BASE_ROW = json.loads((BUNDLE / "row.json").read_text())
BASE_TRACE = [json.loads(line) for line in (BUNDLE / "events.jsonl").read_text().splitlines() if line]
CATALOGUE = recorded_catalogue(BASE_ROW)  # the suite this recorded row was made with
APPLICABLE = [ob.id for ob in OBLIGATIONS if not ob.routed_only]
ORDERED = [ob for ob, needs in TRACE_NEEDS.items() if needs.ordered]
OUTCOMES = ["passed"] * 12 + ["failed", "unsupported", "untestable", "error"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- the order of labels --------------------------------------------------------------------

_BELOW = {  # label -> the labels it may fall to when evidence is removed
    Label.NATIVE: {Label.NATIVE, Label.ADAPTER, Label.APPROXIMATION, Label.UNKNOWN},
    Label.ADAPTER: {Label.ADAPTER, Label.APPROXIMATION, Label.UNKNOWN},
    Label.REJECTED: {Label.REJECTED, Label.APPROXIMATION, Label.UNKNOWN},
    Label.APPROXIMATION: {Label.APPROXIMATION, Label.UNKNOWN},
    Label.UNKNOWN: {Label.UNKNOWN},
    None: {None},
}


def not_raised(after, before) -> bool:
    return after in _BELOW[before]


# -- generators ------------------------------------------------------------------------------


def own_test_anchors(ob_id: str) -> list[str]:
    return [f"test:suites/{k}" for k in CATALOGUE.keys_for("obligation", ob_id)]


ANCHOR_POOL = [
    "source:src/claims.py#Claims",  # pinned only if the runtime has a commit
    "source:src/pinned.py@0123abcd#X",
    "doc:https://example.org/runtime/claims",
    "event:claim.accepted",
    "event:BlockStored",  # resolves only if a surface emits it
    "event:NoSuchEvent",
    "lowering:priority-as-hard-claim",
    "lowering:no-such-probe",
    "test:suites/test_substrates.py::test_repeated_prefix_is_served_from_cache",
    "test:suites/test_nowhere.py::test_missing",
]
KINDS = ["claim-api", "lifecycle-events", "request-priority", "block-events", "host-offload", "counter", "ttl"]
PROPOSALS = [("native", "native conformance")] * 3 + [("adapter", "adapter-scoped evidence")] * 2 + [
    ("patch", "adapter-scoped evidence"), ("native", "approximation substrate"),
    ("none", "approximation substrate"), ("none", "unknown evidence")]


@st.composite
def descriptors(draw) -> dict:
    surfaces = {}
    for i in range(draw(st.integers(1, 3))):
        surfaces[f"s{i}"] = {"kind": draw(st.sampled_from(KINDS)), "summary": "a surface",
                             "anchors": draw(st.lists(st.sampled_from(ANCHOR_POOL), max_size=3, unique=True)),
                             "emits": draw(st.sampled_from([[], ["BlockStored"]]))}
    lowerings = {}
    for ob_id in draw(st.lists(st.sampled_from(APPLICABLE), min_size=1, max_size=6, unique=True)):
        depth, proposed = draw(st.sampled_from(PROPOSALS))
        pool = ANCHOR_POOL + own_test_anchors(ob_id)
        anchors = draw(st.lists(st.sampled_from(pool), max_size=4, unique=True))
        if draw(st.integers(0, 9)) < 7:  # usually cite the obligation's own tests, as a real row would
            anchors = sorted(set(anchors) | set(own_test_anchors(ob_id)))
        low = {"depth": depth, "proposed": proposed, "anchors": anchors}
        if depth != "none" or draw(st.booleans()):
            low["surface"] = draw(st.sampled_from(sorted(surfaces)))
        lowerings[ob_id] = low
    runtime = {"name": "rt", "version": "1.0"}
    if draw(st.integers(0, 4)):
        runtime["commit"] = "v1.0"
    return {"schema": "pytest-rkv/descriptor/1", "backend": "reference", "runtime": runtime,
            "surfaces": surfaces, "lowerings": lowerings}


@st.composite
def rows(draw) -> dict:
    row = copy.deepcopy(BASE_ROW)
    row["depth"] = draw(st.sampled_from(["native", "native", "adapter", "patch", "none"]))
    for section in ("obligations", "substrates", "lowerings"):
        for entry in row[section].values():
            for test in entry["tests"]:
                if test["outcome"] != "not_applicable":
                    test["outcome"] = draw(st.sampled_from(OUTCOMES))
    return row


def trace_copy() -> list[dict]:
    return copy.deepcopy(BASE_TRACE)


DAMAGE = ["drop a test's events", "drop an event's seq", "repeat a seq", "swap two events", "drop an event"]


@st.composite
def runs(draw) -> tuple[dict, list[dict]]:
    """A row and its trace, the trace sometimes damaged (and sometimes re-fingerprinted, as
    if the runtime itself had served the damaged trace)."""
    row, trace = draw(rows()), trace_copy()
    tests = sorted({e["test"] for e in trace})
    for damage in draw(st.lists(st.sampled_from(DAMAGE), max_size=2)):
        nodeid = draw(st.sampled_from(tests))
        mine = [i for i, e in enumerate(trace) if e["test"] == nodeid]
        if not mine:
            continue
        i = draw(st.sampled_from(mine))
        if damage == "drop a test's events":
            trace = [e for e in trace if e["test"] != nodeid]
        elif damage == "drop an event's seq":
            trace[i].pop("seq", None)
        elif damage == "repeat a seq":
            trace[i]["seq"] = trace[draw(st.sampled_from(mine))].get("seq")
        elif damage == "swap two events":
            j = draw(st.sampled_from(mine))
            trace[i], trace[j] = trace[j], trace[i]
        else:
            del trace[i]
    if draw(st.booleans()):
        refingerprint(row, trace)
    return row, trace


def check(descriptor: dict, row: dict | None, trace: list | None):
    return check_lowering(parse_descriptor(descriptor), Evidence(row=row, trace=trace), catalogue=CATALOGUE)


def labels(result) -> dict:
    return {"row": result.label, **{k: c.label for k, c in result.obligations.items()}}


# -- removals --------------------------------------------------------------------------------


def coarse_removals(descriptor: dict, row: dict, trace: list) -> list[tuple[str, dict, dict | None, list | None]]:
    """Removals of whole pieces of evidence: the trace, one test's trace, a substrate or probe
    entry. Few enough to try them all on every example. (Removing the whole row is not one of
    them: a run may earn less than the anchors alone suggest, and the checker never raises
    what the run earned; `test_a_run_backed_label_is_never_above_the_run_s_own` holds that.)"""
    out = [("the trace", descriptor, row, None)]
    for nodeid in sorted({e["test"] for e in trace}):
        out.append((f"the trace of {nodeid}", descriptor, row, [e for e in trace if e["test"] != nodeid]))
    for section in ("substrates", "lowerings"):
        for id_ in row[section]:
            r = copy.deepcopy(row)
            del r[section][id_]
            out.append((f"{section}.{id_}", descriptor, r, trace))
    return out


def removals(descriptor: dict, row: dict, trace: list) -> list[tuple[str, dict, dict | None, list | None]]:
    """Every single removal of an anchor or of a test record, as (what, descriptor, row, trace)."""
    out = []
    for ob_id, low in descriptor["lowerings"].items():
        for i in range(len(low.get("anchors", []))):
            d = copy.deepcopy(descriptor)
            del d["lowerings"][ob_id]["anchors"][i]
            out.append((f"anchor {i} of {ob_id}", d, row, trace))
    for sid, surface in descriptor["surfaces"].items():
        for i in range(len(surface.get("anchors", []))):
            d = copy.deepcopy(descriptor)
            del d["surfaces"][sid]["anchors"][i]
            out.append((f"anchor {i} of surface {sid}", d, row, trace))
    for section in ("obligations", "substrates", "lowerings"):
        for id_, entry in row[section].items():
            for i in range(len(entry["tests"])):
                r = copy.deepcopy(row)
                del r[section][id_]["tests"][i]
                out.append((f"test {i} of {section}.{id_}", descriptor, r, trace))
    return out


@FAST
@given(descriptor=descriptors(), run=runs(), data=st.data())
def test_removing_an_anchor_or_evidence_never_raises_a_label(descriptor, run, data):
    row, trace = run
    before = labels(check(descriptor, row, trace))
    fine = removals(descriptor, row, trace)
    sampled = data.draw(st.lists(st.sampled_from(fine), min_size=1, max_size=6, unique_by=lambda o: o[0]))
    for what, d, r, t in coarse_removals(descriptor, row, trace) + sampled:
        after = labels(check(d, r, t))
        for key in before:
            assert not_raised(after[key], before[key]), f"removing {what} raised {key}: {before[key]} -> {after[key]}"


@FAST
@given(descriptor=descriptors(), run=runs())
def test_a_run_backed_label_is_never_above_the_run_s_own(descriptor, run):
    from pytest_rkv.checker import _read_run, run_label

    row, trace = run
    result = check(descriptor, row, trace)
    parsed, _ = _read_run(Evidence(row=row, trace=trace))
    if parsed is None:
        return
    for ob_id, c in result.obligations.items():
        earned = run_label(ob_id, parsed, CATALOGUE.keys_for("obligation", ob_id))
        if c.label not in (None, Label.REJECTED) and earned is not None:
            assert not_raised(c.label, earned), f"{ob_id}: {c.label} above the run's {earned}"


@FAST
@given(descriptor=descriptors(), run=runs(), data=st.data())
def test_removing_one_event_never_raises_a_label(descriptor, run, data):
    row, trace = run
    index = data.draw(st.integers(0, len(trace) - 1))
    before = labels(check(descriptor, row, trace))
    after = labels(check(descriptor, row, trace[:index] + trace[index + 1:]))
    for key in before:
        assert not_raised(after[key], before[key]), f"removing event {index} raised {key}"


# -- order -----------------------------------------------------------------------------------


def native_descriptor(ob_id: str) -> dict:
    return {"schema": "pytest-rkv/descriptor/1", "backend": "reference",
            "runtime": {"name": "rt", "version": "1", "commit": "v1"},
            "surfaces": {"events": {"kind": "lifecycle-events", "summary": "claim events"}},
            "lowerings": {ob_id: {"surface": "events", "depth": "native", "proposed": "native conformance",
                                  "anchors": own_test_anchors(ob_id)}}}


def native_row() -> dict:
    row = copy.deepcopy(BASE_ROW)
    row["depth"] = "native"
    return row


def refingerprint(row: dict, trace: list[dict]) -> None:
    """Make the row's fingerprints match `trace`, as if the runtime had served it so."""
    for section in row["obligations"].values():
        for test in section["tests"]:
            events = [{k: v for k, v in e.items() if k != "test"} for e in trace if e["test"] == test["nodeid"]]
            test["events"] = len(events)
            test.pop("events_sha256", None)
            if events:
                test["events_sha256"] = events_digest(events)


def test_the_unpermuted_base_is_native_for_every_order_sensitive_obligation():
    for ob_id in ORDERED:
        assert check(native_descriptor(ob_id), native_row(), trace_copy()).obligations[ob_id].label == Label.NATIVE


@FAST
@given(ob_id=st.sampled_from(ORDERED), data=st.data())
def test_permuting_a_tests_events_never_makes_an_order_sensitive_obligation_pass(ob_id, data):
    row, trace = native_row(), trace_copy()
    tests = sorted(t["nodeid"] for t in row["obligations"][ob_id]["tests"])
    nodeid = data.draw(st.sampled_from(tests))
    mine = [e for e in trace if e["test"] == nodeid]
    order = data.draw(st.permutations(range(len(mine))).filter(lambda p: list(p) != sorted(p)))
    permuted = [mine[i] for i in order]
    trace = [e for e in trace if e["test"] != nodeid] + permuted
    refingerprint(row, trace)
    result = check(native_descriptor(ob_id), row, trace).obligations[ob_id]
    assert result.label not in (Label.NATIVE, Label.ADAPTER), result.reason
    assert set(result.codes) & {"missing-order", "ambiguous-order"}, result.codes


@FAST
@given(data=st.data())
def test_shuffling_the_whole_trace_never_passes_an_order_sensitive_obligation_it_disturbed(data):
    row, trace = native_row(), trace_copy()
    shuffled = data.draw(st.permutations(trace))
    refingerprint(row, shuffled)
    for ob_id in ORDERED:
        mine = {t["nodeid"] for t in row["obligations"][ob_id]["tests"]}
        disturbed = any([e for e in shuffled if e["test"] == n] != [e for e in trace if e["test"] == n] for n in mine)
        label = check(native_descriptor(ob_id), row, shuffled).obligations[ob_id].label
        assert label == Label.NATIVE if not disturbed else label not in (Label.NATIVE, Label.ADAPTER)


@FAST
@given(ob_id=st.sampled_from(ORDERED), data=st.data())
def test_dropping_seq_or_duplicating_it_is_ambiguous(ob_id, data):
    row, trace = native_row(), trace_copy()
    nodeid = data.draw(st.sampled_from(sorted(t["nodeid"] for t in row["obligations"][ob_id]["tests"])))
    mine = [i for i, e in enumerate(trace) if e["test"] == nodeid]
    i = data.draw(st.sampled_from(mine))
    if data.draw(st.booleans()):
        del trace[i]["seq"]
    else:
        other = trace[data.draw(st.sampled_from([j for j in mine if j != i]))]
        trace[i]["seq"] = other["seq"]
    refingerprint(row, trace)
    result = check(native_descriptor(ob_id), row, trace).obligations[ob_id]
    assert result.label == Label.APPROXIMATION and "ambiguous-order" in result.codes, result.reason


# -- determinism and totality ------------------------------------------------------------------


@FAST
@given(descriptor=descriptors(), row=rows())
def test_the_checker_is_deterministic(descriptor, row):
    first = check(descriptor, row, trace_copy())
    reordered = json.loads(json.dumps(row, sort_keys=True))  # same content, different key order
    assert check(descriptor, reordered, trace_copy()) == first
    assert check(copy.deepcopy(descriptor), row, trace_copy()) == first


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = ["schema", "backend", "runtime", "surfaces", "lowerings", "name", "routed", "summary", "depth", "obligations",
          "substrates", "tests", "nodeid", "outcome", "events", "events_sha256", "seq", "ts", "type", "claim_id",
          "test", "block_hashes", "tier", "from_state", "to_state", "blocking_claims", "evidence"]
NEAR_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(
        ["pytest-rkv/row/2", "pytest-rkv/descriptor/1", "passed", "failed", "native", "adapter", "claim.accepted",
         "blocks.stored", "blocks.evicted", "host", "c1", "v1", "native conformance", "request-priority"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None)
@given(descriptor=JSON | NEAR_JSON, row=JSON | NEAR_JSON, trace=st.none() | st.lists(JSON | NEAR_JSON, max_size=6))
def test_fuzzed_input_never_crashes_the_checker(descriptor, row, trace):
    result = check_data(descriptor, Evidence(row=row, trace=trace), catalogue=CATALOGUE, source="fuzz.json")
    assert isinstance(result.label, Label)
    if result.malformed:
        assert result.label == Label.UNKNOWN and result.reason.startswith("fuzz.json")


@FAST
@given(descriptor=descriptors(), row=JSON | NEAR_JSON,
       trace=st.lists(st.fixed_dictionaries({"test": st.sampled_from(sorted({e["test"] for e in BASE_TRACE}))},
                                            optional={k: NEAR_JSON for k in FIELDS if k != "test"}), max_size=8))
def test_fuzzed_evidence_with_a_valid_descriptor_never_crashes_and_never_credits(descriptor, row, trace):
    result = check(descriptor, row, trace)
    assert result.label not in (Label.NATIVE, Label.ADAPTER)
    for c in result.obligations.values():
        assert c.findings, "every label comes with a reason"


@FAST
@given(descriptor=descriptors(), row=rows(),
       mangle=st.lists(st.tuples(st.integers(0, len(BASE_TRACE) - 1), st.sampled_from(FIELDS), NEAR_JSON), max_size=5))
def test_mangled_trace_fields_never_crash(descriptor, row, mangle):
    trace = trace_copy()
    for index, key, value in mangle:
        if key != "test":
            trace[index][key] = value
    result = check(descriptor, row, trace)
    assert all(isinstance(c.findings, tuple) and c.findings for c in result.obligations.values())


def test_suite_key_strips_path_and_parameters():
    assert suite_key("suites/test_x.py::test_y[reference-http]") == "test_x.py::test_y"
