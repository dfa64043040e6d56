"""`rkv matrix`: Markdown and a self-contained HTML page with canonical-probe timelines."""

import re
import subprocess
import sys

import pytest

from pytest_rkv.matrix import row_from_bundle


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A native reference row, and the same runtime with hard claims silently evicted."""
    report = tmp_path_factory.mktemp("rows")
    for backend, fault in (("reference", None), ("reference-http", "silent_evict_hard")):
        args = [sys.executable, "-m", "pytest", "suites", f"--rkv-backend={backend}",
                "--rkv-report-dir", str(report), "-q", "-p", "no:cacheprovider"]
        if fault:
            args.append(f"--rkv-reference-fault={fault}")
        subprocess.run(args, capture_output=True, text=True)
    return report


def test_matrix_renders_markdown_and_html(rows, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "matrix",
                           str(rows / "reference"), str(rows / "reference-http"), "--out", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (out / "matrix.md").read_text()
    assert "| reference (run) | native conformance | N | N |" in md
    assert "approximation substrate" in md
    page = (out / "matrix.html").read_text()
    assert page.count("data:image/png;base64,") == 2
    assert not re.search(r"(src|href)=['\"]https?://", page), "the page must open offline"
    assert "title='native conformance: passed; the runtime itself supplies it'" in page


def test_timelines_show_whether_the_resident_survived(rows):
    intact = row_from_bundle(rows / "reference").timeline
    assert [(s["resident"], s["mark"]) for s in intact] == [(60, None), (60, "refused"), (60, None)]
    evicted = row_from_bundle(rows / "reference-http").timeline
    assert evicted[1]["mark"] == "admitted" and evicted[1]["resident_lost"] > 0
    assert evicted[-1]["resident"] < 60


def test_matrix_rejects_a_path_that_is_not_a_bundle(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "matrix", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "neither a bundle" in proc.stderr


def test_one_row_per_runtime_and_cells_agree_with_rkv_check(rows, tmp_path):
    """A run-backed runtime with descriptors is one row: the run's cells, lowered by what the
    checker gives its proposals (never raised), which agrees with `rkv check` on that evidence."""
    from pytest_rkv.checker import check_file
    from pytest_rkv.descriptor import load_evidence
    from pytest_rkv.matrix import CODES

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "matrix", str(rows / "reference"), "backends/",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    md = (out / "matrix.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| row")]
    names = [line.split("|")[1].split(" (")[0].strip() for line in table]
    assert len(names) == len(set(names)), names
    assert {"reference", "vllm", "vllm+rkv", "sglang"} <= set(names)
    check = check_file("backends/reference/reference.toml", load_evidence(rows / "reference" / "row.json"))
    codes = [CODES[c.label.value if c.label else None] for c in check.obligations.values()]
    assert next(line for line in table if line.startswith("| reference (run)")).endswith(" | ".join(codes) + " |")


def test_the_checker_never_raises_a_label_the_run_did_not_earn(rows):
    """The silently evicting runtime, judged with the reference descriptor (native proposals):
    every cell is at most the run's own label."""
    from pytest_rkv.checker import check_file
    from pytest_rkv.descriptor import load_evidence
    from pytest_rkv.evidence import read_row

    rank = ["rejected mapping", "unknown evidence", "approximation substrate", "adapter-scoped evidence",
            "native conformance"]
    row = read_row(rows / "reference-http")
    check = check_file("backends/reference/reference.toml", load_evidence(rows / "reference-http" / "row.json"))
    for ob_id, c in check.obligations.items():
        earned = row.obligations[ob_id].label
        if c.label is not None and earned is not None:
            assert rank.index(c.label.value) <= rank.index(earned.value), (ob_id, c.label, earned)


def test_the_committed_matrix_lists_each_runtime_once_and_its_links_resolve():
    from pathlib import Path

    reports = Path(__file__).resolve().parents[2] / "reports"
    md = (reports / "matrix.md").read_text()
    names = [line.split("|")[1].split(" (")[0].strip() for line in md.splitlines()
             if line.startswith("| ") and not line.startswith("| row")]
    assert names and len(names) == len(set(names)), names
    page = (reports / "matrix.html").read_text()
    links = re.findall(r"href='([^']+)'", page)
    assert any(link.startswith("bundles/") for link in links)
    missing = [link for link in links if not (reports / link).resolve().is_file()]
    assert not missing, f"links that do not resolve in the repository: {missing}"
