"""pytest entry point: options, markers, fixtures, outcome mapping and row reporting.

Wiring only. The contract, drivers, labels and rows live in their own modules.

Fixture tiers:
* `rkv_backend` (session, parametrized by --rkv-backend): one started driver per backend.
  Tests are grouped by backend, so one server runs at a time and is stopped before the
  next starts (GPU memory hygiene).
* `rkv` (function): checks the backend is alive, resets it to an empty pool, and hands
  the test a `Probe`.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass

import pytest

from pytest_rkv.certify import register_secrets
from pytest_rkv.certify import command_line, environment, invocation_problems, suite_files, suite_hash, target_dir
from pytest_rkv.config import RkvConfig, add_options, get_config
from pytest_rkv.contract import OBLIGATIONS, OBLIGATIONS_BY_ID, SUBSTRATES_BY_ID, TestOutcome
from pytest_rkv.drivers.base import Driver, DriverSettings
from pytest_rkv.drivers.process import stop_all
from pytest_rkv.drivers.registry import driver_class
from pytest_rkv.errors import NotApplicable, Unsupported
from pytest_rkv.drivers.recording import Recorder
from pytest_rkv.report import RESULT_KEY, ReportDirError, RowCollector, claim_bundle_dir, prepare
from pytest_rkv.workload import Probe

CONFIG_KEY = pytest.StashKey[RkvConfig]()
EVIDENCE_KEY = pytest.StashKey[dict]()
RECORDER_KEY = pytest.StashKey[Recorder]()  # the test's transcript of Driver calls
RUNTIMES_KEY = pytest.StashKey[dict]()  # backend name -> describe() dict, per process
CURSORS_KEY = pytest.StashKey[dict]()  # backend name -> last block-event seq captured


@dataclass(frozen=True)
class Subject:
    """What a suite test is about, read from its marker."""

    kind: str  # obligation | substrate | lowering
    id: str


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    """`pytest --rkv-backend=X` with no path runs the released suite, from any directory.

    Only a run that asks for rows on the command line gets it: plain `pytest` keeps the
    project's own testpaths, and explicit paths are left alone. Appending here, before
    pytest turns `args` into `config.args`, keeps the rootdir the invocation directory (a
    suite path given by hand would make pytest look for its rootdir in site-packages)."""
    known = early_config.known_args_namespace
    asked = getattr(known, "rkv_backend", None) is not None or getattr(known, "rkv_certify", None)
    if asked and not getattr(known, "file_or_dir", None):
        from pytest_rkv.locations import suite_dir

        args.append(str(suite_dir()))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rkv_obligation(id): the test is evidence for this obligation")
    config.addinivalue_line("markers", "rkv_substrate(id): the test records a substrate (never an obligation)")
    config.addinivalue_line("markers", "rkv_lowering(id, obligation): the test probes a proposed lowering")
    config.addinivalue_line("markers", "rkv_litmus(case): the litmus case the test exercises")
    for ob in OBLIGATIONS:
        config.addinivalue_line("markers", f"{_marker_name(ob.id)}: {ob.title} (added to its tests)")
    rkv_config = get_config(config)
    config.stash[CONFIG_KEY] = rkv_config
    register_secrets(rkv_config.secrets())  # tokens from options, ini or env: never in a bundle
    config.stash[RUNTIMES_KEY] = {}
    config.stash[CURSORS_KEY] = {}
    if not hasattr(config, "workerinput"):  # the controller (or a run without xdist)
        if rkv_config.certify:
            problems = invocation_problems(config.option, config.args)
            if problems:
                raise pytest.UsageError(
                    "--rkv-certify refuses this run, a certified row needs the whole released suite:\n  "
                    + "\n  ".join(problems)
                )
        def run_facts() -> dict:  # only computed when a row is written
            suite = target_dir(config.args)
            return {
                "certified": rkv_config.certify,
                "suite_hash": suite_hash(suite_files(suite)) if suite else "unidentified",
                "environment": environment(),
                "command_line": command_line(),
            }

        # Empty the bundle directories only for a run that asked for rows explicitly: an
        # unrelated suite in a project with this plugin installed must touch nothing. Only
        # a folder the suite created (its marker) is ever emptied.
        explicit = rkv_config.certify or config.getoption("rkv_backend") is not None
        if explicit:
            try:
                prepare(rkv_config.report_dir, rkv_config.backends)
            except (ReportDirError, OSError) as exc:
                raise pytest.UsageError(f"pytest-rkv refuses to start: {exc}") from None
        collector = RowCollector(rkv_config.report_dir, rkv_config.backends, run_facts,
                                 descriptors=rkv_config.descriptors)
        config.pluginmanager.register(collector, "rkv-rows")
        # Keep each backend's tests on one xdist worker, so no two processes share a pool.
        # (xdist chose "load" for -n in its cmdline_main; workers copy options later.)
        if getattr(config.option, "dist", "no") == "load":
            config.option.dist = "loadgroup"
    elif config.workerinput.get("rkv_loadgroup"):
        # Workers do not see the controller's late switch to loadgroup; without this they
        # never tag node ids with the group and one backend's tests spread over workers.
        config.option.loadgroup = True


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist controller: tell each worker that its backends are grouped."""
    if getattr(node.config.option, "dist", "no") == "loadgroup":
        node.workerinput["rkv_loadgroup"] = True


DESELECTED_KEY = pytest.StashKey[list]()


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        items[0].config.stash.setdefault(DESELECTED_KEY, []).extend(item.nodeid for item in items)


def pytest_collection_finish(session: pytest.Session) -> None:
    deselected = session.config.stash.get(DESELECTED_KEY, [])
    if deselected and session.config.stash[CONFIG_KEY].certify:
        pytest.exit(
            f"--rkv-certify refuses this run: {len(deselected)} tests were deselected "
            f"(e.g. {deselected[0]}); a certified row needs the whole released suite",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    stop_all()  # backstop: nothing a fixture started may outlive the session


def _marker_name(obligation_id: str) -> str:
    return "rkv_" + obligation_id.replace("-", "_")


def _subject(item: pytest.Item) -> Subject | None:
    for kind in ("obligation", "substrate", "lowering"):
        mark = item.get_closest_marker(f"rkv_{kind}")
        if mark is not None:
            return Subject(kind, mark.args[0])
    return None


# -- parametrization and collection ---------------------------------------------------


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "rkv_backend" in metafunc.fixturenames:
        backends = metafunc.config.stash[CONFIG_KEY].backends
        metafunc.parametrize("rkv_backend", backends, indirect=True, scope="session", ids=backends)


@pytest.hookimpl(tryfirst=True)  # before xdist's worker hook reads the xdist_group markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        subject = _subject(item)
        if subject is None:
            continue
        known = {"obligation": OBLIGATIONS_BY_ID, "substrate": SUBSTRATES_BY_ID}.get(subject.kind)
        if known is not None and subject.id not in known:
            raise pytest.UsageError(f"{item.nodeid}: unknown {subject.kind} {subject.id!r}")
        if subject.kind == "obligation":
            item.add_marker(_marker_name(subject.id))
        callspec = getattr(item, "callspec", None)
        if callspec is not None and "rkv_backend" in callspec.params:
            item.add_marker(pytest.mark.xdist_group(callspec.params["rkv_backend"]))


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="session")
def rkv_config(pytestconfig: pytest.Config) -> RkvConfig:
    return pytestconfig.stash[CONFIG_KEY]


@pytest.fixture(scope="session")
def rkv_backend(request: pytest.FixtureRequest, rkv_config: RkvConfig, tmp_path_factory):
    """The started driver for one backend (session-scoped; parametrized by name)."""
    name = request.param
    try:
        workdir = claim_bundle_dir(rkv_config.report_dir, name)
    except ReportDirError as exc:
        raise pytest.UsageError(str(exc)) from None
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if worker:  # under xdist each worker keeps its own logs and sockets
        workdir = workdir / worker
    workdir.mkdir(parents=True, exist_ok=True)
    settings = DriverSettings(
        workdir=workdir,
        url=rkv_config.url,
        block_size=rkv_config.block_size,
        model=rkv_config.model,
        startup_timeout=rkv_config.startup_timeout,
        refusal_timeout=rkv_config.refusal_timeout,
        reference_faults=rkv_config.reference_faults,
        replay=rkv_config.replay,
        tenant_tokens=rkv_config.tenant_tokens,
        admin_token=rkv_config.admin_token,
    )
    driver = driver_class(name)(settings)
    request.addfinalizer(driver.stop)  # registered before start: a failed start cleans up too
    driver.start()
    request.config.stash[RUNTIMES_KEY][name] = driver.describe()
    return driver


@pytest.fixture
def rkv(request: pytest.FixtureRequest, rkv_backend: Driver) -> Probe:
    """A clean pool on a live backend, and the probe vocabulary to use it.

    The test sees the driver through a `Recorder`: every call, these three included, goes
    into the test's transcript (what `rkv verify` replays)."""
    if hasattr(rkv_backend, "begin_test"):  # the replay backend serves this test's transcript
        rkv_backend.begin_test(request.node.nodeid)
    driver = request.node.stash[RECORDER_KEY] = Recorder(rkv_backend, request.node.nodeid)
    driver.check_alive()
    driver.reset()
    evidence = request.node.stash.setdefault(EVIDENCE_KEY, {})
    return Probe(driver, driver.info(), evidence.__setitem__)


# -- outcomes -------------------------------------------------------------------------


def _classify(call: pytest.CallInfo, report: pytest.TestReport) -> tuple[TestOutcome, str]:
    if report.passed:
        return TestOutcome.PASSED, ""
    excinfo = call.excinfo
    if excinfo is None:
        return TestOutcome.ERROR, "no outcome recorded"
    exc = excinfo.value
    if isinstance(exc, Unsupported):
        kind = TestOutcome.UNSUPPORTED if exc.scope == "feature" else TestOutcome.UNTESTABLE
        return kind, exc.reason
    if isinstance(exc, NotApplicable):
        return TestOutcome.NOT_APPLICABLE, str(exc)
    if report.skipped:
        return TestOutcome.ERROR, f"skipped without an unsupported signal: {exc}"
    message = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    if isinstance(exc, (AssertionError, pytest.fail.Exception)) and report.when == "call":
        return TestOutcome.FAILED, message[:2000]
    return TestOutcome.ERROR, f"{report.when}: {message[:4000]}"


def _capture_trace(item: pytest.Item, backend: str) -> list[dict]:
    """The events the test left behind: the RKV lifecycle stream if the backend has one,
    else its block-level feed since the previous test. Best effort: a dead backend gives
    no trace, and that must not hide the test's own outcome."""
    probe = item.funcargs.get("rkv")
    if not isinstance(probe, Probe):
        return []
    try:
        try:
            events = probe.driver.events()
        except Unsupported:
            cursors = item.config.stash[CURSORS_KEY]
            events = probe.driver.block_events(after=cursors.get(backend, 0))
            if events:
                cursors[backend] = events[-1].seq
    except Exception:
        return []
    return [e.model_dump(mode="json") for e in events]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    subject = _subject(item)
    callspec = getattr(item, "callspec", None)
    if subject is None or callspec is None or "rkv_backend" not in callspec.params:
        return report
    if report.when == "call" or report.failed or (report.when == "setup" and report.skipped):
        outcome, detail = _classify(call, report)
        if outcome in (TestOutcome.UNSUPPORTED, TestOutcome.UNTESTABLE, TestOutcome.NOT_APPLICABLE):
            path, lineno, _ = item.location
            report.outcome = "skipped"
            report.longrepr = (str(path), (lineno or 0) + 1, f"{outcome.value}: {detail}")
        backend = callspec.params["rkv_backend"]
        # An instance may label itself (the replay backend labels as the recorded backend).
        driver = item.funcargs.get("rkv_backend") or driver_class(backend)
        events = _capture_trace(item, backend) if report.when == "call" else []
        recorder = item.stash.get(RECORDER_KEY, None)
        record = {
            "nodeid": item.nodeid.removesuffix(f"@{callspec.params['rkv_backend']}"),  # xdist's group tag
            "backend": backend,
            "depth": driver.depth,
            "routed": driver.routed,
            "kind": subject.kind,
            "id": subject.id,
            "outcome": outcome.value,
            "detail": detail,
            "evidence": item.stash.get(EVIDENCE_KEY, {}),
            "runtime": item.config.stash[RUNTIMES_KEY].get(backend, {}),
            "events": events,
            "calls": list(recorder.calls) if recorder is not None else [],
        }
        report.user_properties.append((RESULT_KEY, json.dumps(record, sort_keys=True)))
        item.user_properties[:] = [p for p in item.user_properties if p[0] not in ("rkv_outcome", RESULT_KEY)]
        item.user_properties += [("rkv_backend", backend), (f"rkv_{subject.kind}", subject.id),
                                 ("rkv_outcome", outcome.value)]
    return report


def pytest_report_teststatus(report: pytest.TestReport, config: pytest.Config):
    for key, value in getattr(report, "user_properties", ()):
        if key == RESULT_KEY and report.skipped:
            outcome = json.loads(value)["outcome"]
            if outcome == "unsupported":
                return "unsupported", "u", "UNSUPPORTED"
            if outcome == "untestable":
                return "untestable", "t", "UNTESTABLE"
            if outcome == "not_applicable":
                return "inapplicable", "n", "N/A"
    return None
