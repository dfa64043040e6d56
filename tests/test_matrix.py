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
    assert "| reference (pytest-rkv-reference 0.1.0) (run) | native conformance | N | N |" in md
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
