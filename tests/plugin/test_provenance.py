"""Provenance in every row: suite, runtime build, platform, stand-ins, redacted command line."""

from __future__ import annotations

import json

from pytest_rkv.certify import environment
from pytest_rkv.provenance import distribution_facts, row_provenance, runtime_provenance, summary


def test_a_distribution_is_named_with_a_hash_of_its_installed_files():
    facts = distribution_facts("pytest")
    assert facts["name"].lower() == "pytest" and facts["version"]
    assert facts["files_sha256"] and len(facts["files_sha256"]) == 64
    assert distribution_facts("no-such-distribution-xyz") is None


def test_the_server_command_line_is_redacted_as_one_line():
    facts = runtime_provenance({"server_argv": ["vllm", "serve", "--api-key", "s3cr3t-value", "--port", "1"],
                                "stand_ins": ["sgl_kernel (import-only)"]})
    assert "s3cr3t-value" not in facts["server_command"] and "--port 1" in facts["server_command"]
    assert facts["stand_ins"] == ["sgl_kernel (import-only)"]


def test_row_provenance_names_suite_platform_and_stand_ins():
    prov = row_provenance({"runtime": "x", "distribution": "pytest==0", "stand_ins": ["a stand-in"]},
                          environment(), "0.1.0", "ab" * 32)
    assert prov["suite"] == {"version": "0.1.0", "hash": "ab" * 32}
    assert prov["distribution"]["name"].lower() == "pytest" and prov["python"]
    line = summary(prov)
    assert "suite 0.1.0 (abababababab)" in line and "stand-ins: a stand-in" in line


def test_every_row_carries_its_provenance(run_suites):
    run = run_suites("--rkv-backend=reference")
    row = run.row("reference")
    prov = row["provenance"]
    assert prov["suite"]["hash"] == row["suite_hash"]
    assert prov["distribution"]["name"] == "pytest-rkv" and prov["python"] and prov["platform"]
    run.result.stdout.fnmatch_lines(["*provenance: suite *pytest-rkv*"])
    assert json.dumps(prov)  # plain JSON, verified as data by the manifest
