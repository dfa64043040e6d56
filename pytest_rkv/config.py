"""The run's configuration, resolved once: command line > ini > default.

Each option is declared once here (`OPTIONS`) and registered both as `--rkv-x` and as the
ini key `rkv_x`, with the same help text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
}


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

    replay = _value(config, "replay")
    if "replay" in backends and not replay:
        raise pytest.UsageError("--rkv-backend=replay needs --rkv-replay BUNDLE (it serves a bundle's transcript)")
    if "replay" in backends and bool(config.getoption("rkv_certify") or config.getini("rkv_certify")):
        raise pytest.UsageError("--rkv-certify refuses the replay backend: it replays a bundle, it is not a runtime")
    replay_dir = Path(config.invocation_params.dir) / replay if replay else None

    report_dir = Path(_value(config, "report-dir") or "rkv-report")
    if not report_dir.is_absolute():
        report_dir = Path(config.invocation_params.dir) / report_dir
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
    )
