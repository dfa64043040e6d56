"""Provenance: what a reader needs to reproduce a row's environment.

A row says which suite ran (version and hash), against which runtime build (distribution
name, version, and a hash of its installed files), on which Python, torch, platform and
accelerator, with which stand-ins or patches in the environment, and with which server
command line (redacted). Drivers contribute the runtime's part through `describe()`:

* `distribution`: `"name==version"` of the runtime's distribution in this interpreter, or
  an already-measured `{"name", "version", "files_sha256"}` for a runtime in its own venv
  (`distribution_facts(name, python=...)` measures it there);
* `stand_ins`: the stand-ins or patches the driver put in the runtime's environment;
* `server_argv`: the server's command line.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from importlib import metadata

# Run in the runtime's own interpreter: no pytest-rkv there, so the measurement is inline.
_MEASURE = """
import hashlib, json, sys
from importlib import metadata
try:
    dist = metadata.distribution(sys.argv[1])
except metadata.PackageNotFoundError:
    print("null"); raise SystemExit
record = dist.read_text("RECORD") or ""
print(json.dumps({"name": dist.metadata["Name"], "version": dist.version,
                  "files_sha256": hashlib.sha256(record.encode()).hexdigest() if record else None}))
"""


def distribution_facts(name: str, python: str | None = None) -> dict | None:
    """Name, version and a hash of the installed files of distribution `name` (the sha256 of
    its RECORD, which lists every installed file with its own hash), in `python`'s
    environment (default: this one). None when it is not installed there."""
    if python is None or python == sys.executable:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return None
        record = dist.read_text("RECORD") or ""
        return {"name": dist.metadata["Name"], "version": dist.version,
                "files_sha256": hashlib.sha256(record.encode()).hexdigest() if record else None}
    out = subprocess.run([python, "-c", _MEASURE, name], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


def runtime_provenance(runtime: dict) -> dict:
    """The runtime's part of a row's provenance, from its driver's `describe()`."""
    from pytest_rkv.certify import redact

    dist = runtime.get("distribution")
    if isinstance(dist, str):
        dist = distribution_facts(dist.partition("==")[0]) or {"name": dist}
    argv = runtime.get("server_argv")
    return {
        "runtime": runtime.get("runtime"),
        "runtime_version": runtime.get("runtime_version"),
        "distribution": dist,
        "stand_ins": list(runtime.get("stand_ins") or []),
        # joined before redacting, so "--api-key", "X" is caught as one option and value
        "server_command": redact(shlex.join(map(str, argv))) if argv else None,
    }


def row_provenance(runtime: dict, environment: dict, suite_version: str, suite_hash: str) -> dict:
    """The whole provenance section of one row."""
    packages = environment.get("packages", {})
    return {
        "suite": {"version": suite_version, "hash": suite_hash},
        **runtime_provenance(runtime),
        "python": environment.get("python"),
        "torch": packages.get("torch"),
        "platform": f"{environment.get('os')} {environment.get('machine')}",
        "accelerator": environment.get("gpu") or f"CPU: {environment.get('cpu')}",
    }


def summary(provenance: dict) -> str:
    """One line for the terminal summary and the matrix caption."""
    dist = provenance.get("distribution") or {}
    parts = [f"suite {provenance['suite']['version']} ({provenance['suite']['hash'][:12]})"]
    if dist.get("name"):
        files = dist.get("files_sha256")
        parts.append(f"{dist['name']} {dist.get('version', '?')}" + (f" (files {files[:12]})" if files else ""))
    parts.append(f"python {provenance.get('python')}" + (f", torch {provenance['torch']}" if provenance.get("torch") else ""))
    accelerator = provenance.get("accelerator")
    parts.append(accelerator if isinstance(accelerator, str) else ", ".join(g.get("name", "?") for g in accelerator))
    if provenance.get("stand_ins"):
        parts.append("stand-ins: " + ", ".join(map(str, provenance["stand_ins"])))
    return "; ".join(parts)
