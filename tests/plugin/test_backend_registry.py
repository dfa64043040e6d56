"""Backends as plugins: the entry-point registry, `rkv backends`, missing runtimes as usage
errors, and the worked out-of-tree example (`examples/rkv-command-backend`) earning a row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_rkv.drivers.registry import installed

BUILT_INS = ("reference", "reference-http", "rkv-http", "vllm", "vllm+rkv", "vllm+lmcache", "dynamo")


def _fake_distribution(root: Path, entry: str, module_text: str) -> dict[str, str]:
    """An installed distribution (dist-info plus module) on a PYTHONPATH of its own, for a
    child process: the registry reads real metadata, nothing is patched."""
    dist = root / "vendor_runtime-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vendor-runtime\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[pytest_rkv.backends]\n{entry}\n")
    (root / "vendor_driver.py").write_text(textwrap.dedent(module_text))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def test_built_in_backends_are_registered_as_entry_points():
    backends = installed()
    for name in BUILT_INS:
        assert backends[name].distribution == "pytest-rkv", backends[name]
    assert backends["vllm"].extras, "the vllm entry point must name the extra that installs vLLM"


def test_rkv_backends_lists_every_backend_with_depth_and_origin():
    out = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "backends"], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert set(BUILT_INS) <= set(lines)
    assert "depth native" in lines["reference"] and "pytest-rkv" in lines["reference"]


def test_a_missing_runtime_is_a_usage_error_naming_the_extra(tmp_path):
    env = _fake_distribution(tmp_path / "site", "vendor = vendor_driver:VendorDriver [vendor-gpu]", """
        from pytest_rkv.drivers.base import Driver

        class VendorDriver(Driver):
            name = "vendor"
            requires = ("no_such_runtime_module_xyz",)
            def info(self): ...
            def reset(self): ...
            def complete(self, req): ...
    """)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--rkv-backend=vendor", "-p", "no:cacheprovider",
                           "--rkv-report-dir", str(tmp_path / "report")],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "INTERNALERROR" not in proc.stdout + proc.stderr
    assert "no_such_runtime_module_xyz" in proc.stderr
    assert "pip install 'vendor-runtime[vendor-gpu]'" in proc.stderr
    assert not (tmp_path / "report").exists(), "a refused run must write nothing"


def test_a_backend_whose_module_cannot_import_is_a_usage_error(tmp_path):
    env = _fake_distribution(tmp_path / "site", "broken = vendor_driver:Driver [vendor-gpu]",
                             "import no_such_runtime_module_xyz\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "--rkv-backend=broken", "-p", "no:cacheprovider"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == pytest.ExitCode.USAGE_ERROR, proc.stdout + proc.stderr
    assert "INTERNALERROR" not in proc.stdout + proc.stderr
    assert "No module named 'no_such_runtime_module_xyz'" in proc.stderr and "[vendor-gpu]" in proc.stderr


@pytest.fixture
def example_backend():
    if "command" not in installed():
        pytest.skip("the example backend is not installed: pip install -e examples/rkv-command-backend "
                    "(scripts/setup.sh does)")
    return f"{sys.executable} -m pytest_rkv.cli serve --port {{port}}"


def test_the_example_out_of_tree_backend_earns_its_row(example_backend, tmp_path):
    report = tmp_path / "report"
    # RKV API v1.1: the server gets two tenants and an admin token, the plugin the same tokens
    env = {**os.environ, "RKV_COMMAND": example_backend, "RKV_TOKENS": "tenant-a-token-1=a,tenant-b-token-2=b",
           "RKV_ADMIN_TOKEN": "admin-token-3456", "RKV_TENANT_TOKENS": "tenant-a-token-1,tenant-b-token-2"}
    listed = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "backends"], capture_output=True, text=True,
                            env=env, check=True).stdout
    assert any(line.startswith("command ") and "rkv-command-backend" in line and "depth native" in line
               for line in listed.splitlines()), listed
    # From an empty directory, with no path: the released suite, as a vendor would run it.
    work = tmp_path / "empty"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--rkv-backend=command", "--rkv-report-dir", str(report),
                           "-p", "no:cacheprovider", "-q"], capture_output=True, text=True, env=env, cwd=work,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    row = json.loads((report / "command" / "row.json").read_text())
    assert row["label"] == "native conformance", row["reason"]
    assert row["backend"] == "command"
    assert not (work / "rkv-report").exists(), "the row went to the invocation directory, not --rkv-report-dir"
