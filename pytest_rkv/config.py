"""The run's configuration, resolved once: command line > ini > default.

Each option is declared once here (`OPTIONS`) and registered both as `--rkv-x` and as the
ini key `rkv_x`, with the same help text.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_rkv.drivers.registry import BackendUnavailable, UnknownBackend, driver_class, installed
from pytest_rkv.locations import descriptors_dir as released_descriptors
from pytest_rkv.reference.runtime import FAULT_MODES

# name -> (help, default)
OPTIONS: dict[str, tuple[str, str | None]] = {
    "backend": (
        "backend(s) to test, comma-separated; each becomes its own row (`rkv backends` lists "
        "the installed ones)",
        "reference",
    ),
    "url": ("base URL of an already-running RKV API v1 server (backend rkv-http)", None),
    "report-dir": ("where row.json and server logs go", "rkv-report"),
    "block-size": ("tokens per KV block (default: the backend's own; vLLM: 32 on CPU, 16 on GPU)", None),
    "model": ("model path or hub id for real-runtime backends (default: a generated tiny model)", None),
    "startup-timeout": ("seconds a backend server may take to become ready", "240"),
    "refusal-timeout": (
        "seconds a completion may stay unanswered before the test records that the runtime "
        "neither admitted nor refused it (a failed active refusal, not a harness error); "
        "30 s is ample for a GPU runtime and keeps CI fast",
        "30",
    ),
    "descriptors": (
        "directory of lowering descriptors; each backend's bundle gets its descriptors and "
        "their checked labels (default: the descriptors installed with pytest-rkv)",
        None,
    ),
    "replay": ("a bundle whose transcript the replay backend serves (rkv verify's tool, never certifiable)", None),
    "reference-fault": (
        "break the reference runtime on purpose (comma-separated fault modes): "
        + ", ".join(FAULT_MODES),
        None,
    ),
    "tenant-tokens": (
        "RKV API v1.1 (rkv-http): bearer tokens of two tenants, comma-separated; the suite calls "
        "as the first, isolation probes as the second (else $RKV_TENANT_TOKENS). Redacted in bundles",
        None,
    ),
    "admin-token": (
        "RKV API v1.1 (rkv-http): the admin token for reset and faults (else $RKV_ADMIN_TOKEN). "
        "Redacted in bundles",
        None,
    ),
}
# Secrets may also come from the environment, so they need not sit on a command line.
SECRET_ENV = {"tenant-tokens": "RKV_TENANT_TOKENS", "admin-token": "RKV_ADMIN_TOKEN"}


@dataclass(frozen=True)
class RkvConfig:
    backends: tuple[str, ...]
    url: str | None
    report_dir: Path
    block_size: int | None
    model: str | None
    startup_timeout: float
    refusal_timeout: float
    reference_faults: frozenset[str]
    certify: bool
    descriptors: Path | None
    replay: Path | None = None
    tenant_tokens: tuple[str, ...] = ()
    admin_token: str | None = None

    def secrets(self) -> list[str]:
        return [t for t in (*self.tenant_tokens, self.admin_token) if t]


CERTIFY_HELP = (
    "certify the rows: refuse test selection, deselection, --lf, xfail overrides and a "
    "modified suite; every obligation must run; bundles are marked certified"
)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("rkv", "Resident KV Claims conformance")
    for name, (help_text, default) in OPTIONS.items():
        group.addoption(f"--rkv-{name}", dest=f"rkv_{name.replace('-', '_')}", default=None, help=help_text)
        parser.addini(f"rkv_{name.replace('-', '_')}", help_text, default=default)
    group.addoption("--rkv-certify", dest="rkv_certify", action="store_true", default=None, help=CERTIFY_HELP)
    parser.addini("rkv_certify", CERTIFY_HELP, type="bool", default=False)


def _value(config: pytest.Config, name: str) -> str | None:
    key = f"rkv_{name.replace('-', '_')}"
    cli = config.getoption(key, default=None)
    if cli is not None:
        return cli
    ini = config.getini(key)
    return ini if ini not in ("", None) else None


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


def get_config(config: pytest.Config) -> RkvConfig:
    """Resolve and validate every option; bad values are usage errors, at the door."""
    backends = _split(_value(config, "backend"))
    if not backends:
        raise pytest.UsageError(f"--rkv-backend is empty; installed: {', '.join(installed())}")
    for name in backends:
        try:
            driver_class(name)  # unknown, or its runtime missing: a usage error, before collection
        except (UnknownBackend, BackendUnavailable) as exc:
            raise pytest.UsageError(f"--rkv-backend: {exc}") from None
    if len(set(backends)) != len(backends):
        raise pytest.UsageError(f"--rkv-backend names a backend twice: {','.join(backends)}")

    block_size = _value(config, "block-size")
    startup = _value(config, "startup-timeout") or "240"
    try:
        block_size_n = int(block_size) if block_size else None
        startup_s = float(startup)
    except ValueError:
        raise pytest.UsageError(
            f"--rkv-block-size must be an integer and --rkv-startup-timeout a number "
            f"(got {block_size!r}, {startup!r})"
        ) from None
    if block_size_n is not None and block_size_n < 1:
        raise pytest.UsageError(f"--rkv-block-size must be positive, got {block_size_n}")
    refusal = _value(config, "refusal-timeout") or "30"
    try:
        refusal_s = float(refusal)
    except ValueError:
        refusal_s = float("nan")
    if not refusal_s > 0 or refusal_s == float("inf"):
        raise pytest.UsageError(f"--rkv-refusal-timeout must be a positive number of seconds, got {refusal!r}")
    if not math.isfinite(startup_s) or startup_s <= 0:
        raise pytest.UsageError(f"--rkv-startup-timeout must be a finite number of seconds > 0, got {startup!r}")

    faults = frozenset(_split(_value(config, "reference-fault")))
    unknown = faults - set(FAULT_MODES)
    if unknown:
        raise pytest.UsageError(
            f"--rkv-reference-fault: unknown fault mode(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(FAULT_MODES)}"
        )
    url = _value(config, "url")
    if "rkv-http" in backends and not url:
        raise pytest.UsageError("--rkv-backend=rkv-http needs --rkv-url (the RKV API v1 server to test)")
    if url is not None:
        _check_url(url)

    replay = _value(config, "replay")
    if "replay" in backends and not replay:
        raise pytest.UsageError("--rkv-backend=replay needs --rkv-replay BUNDLE (it serves a bundle's transcript)")
    if "replay" in backends and bool(config.getoption("rkv_certify") or config.getini("rkv_certify")):
        raise pytest.UsageError("--rkv-certify refuses the replay backend: it replays a bundle, it is not a runtime")
    replay_dir = Path(config.invocation_params.dir) / replay if replay else None

    report_dir = Path(_value(config, "report-dir") or "rkv-report")
    if not report_dir.is_absolute():
        report_dir = Path(config.invocation_params.dir) / report_dir
    _check_writable(report_dir)
    tokens = _split(_value(config, "tenant-tokens") or os.environ.get(SECRET_ENV["tenant-tokens"]))
    admin_token = _value(config, "admin-token") or os.environ.get(SECRET_ENV["admin-token"]) or None
    if len(set(tokens)) != len(tokens) or (admin_token and admin_token in tokens):
        raise pytest.UsageError("--rkv-tenant-tokens/--rkv-admin-token: each tenant needs its own token, "
                                "and the admin token must differ from them")
    descriptors = _value(config, "descriptors")
    if descriptors is not None:
        descriptors_dir = Path(config.invocation_params.dir) / descriptors
        if not descriptors_dir.is_dir():
            raise pytest.UsageError(f"--rkv-descriptors: {descriptors_dir} is not a directory")
    else:
        descriptors_dir = released_descriptors()
    return RkvConfig(
        backends=tuple(backends),
        url=url,
        report_dir=report_dir,
        block_size=block_size_n,
        model=_value(config, "model"),
        startup_timeout=startup_s,
        refusal_timeout=refusal_s,
        reference_faults=faults,
        certify=bool(config.getoption("rkv_certify") or config.getini("rkv_certify")),
        descriptors=descriptors_dir,
        replay=replay_dir,
        tenant_tokens=tuple(tokens),
        admin_token=admin_token,
    )


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        parts.port  # raises on a port that is not a number in 0..65535
    except ValueError as exc:
        raise pytest.UsageError(f"--rkv-url: {url!r} has a bad port ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise pytest.UsageError(f"--rkv-url: {url!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise pytest.UsageError(f"--rkv-url: {url!r} must be a base URL (no credentials, query or fragment)")


def _check_writable(report_dir: Path) -> None:
    """The report directory must be a directory we can write (or create), checked now, not
    after the first backend has run."""
    existing = report_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise pytest.UsageError(f"--rkv-report-dir: {existing} exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise pytest.UsageError(f"--rkv-report-dir: cannot write in {existing}: {exc.strerror or exc}") from None
