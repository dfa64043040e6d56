"""`rkv` commands and plugin options: bad input is one line on stderr and a non-zero exit
(or a usage error), never a traceback; nothing is started or written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from pytest_rkv.cli import main


def _rkv(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse refuses
        code = exc.code
    err = capsys.readouterr().err.strip()
    return code, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    return lines[-1]


@pytest.mark.parametrize("argv, words", [
    (["--port", "70000"], "not a TCP port"),
    (["--port", "abc"], "not an integer"),
    (["--port", "-1"], "below 0"),
    (["--host", "bad host!"], "not an IP address or host name"),
    (["--blocks", "0"], "below 1"),
    (["--claim-budget", "-5"], "below 0"),
    (["--host-blocks", "-1"], "below 0"),
    (["--block-size", "0"], "below 1"),
    (["--tenant-budget", "0"], "below 1"),
    (["--fault", "gremlins"], "invalid choice"),
])
def test_serve_refuses_bad_arguments_in_one_line(capsys, argv, words):
    code, err = _rkv(capsys, "serve", *argv)
    assert code == 2 and words in _one_line(err), err


def test_serve_on_a_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = _rkv(capsys, "serve", "--port", str(port))
    assert code == 2 and _one_line(err) == (
        f"rkv serve: port {port} on 127.0.0.1 is already in use; pick another, or --port 0 for a free one")


def test_serve_on_an_address_it_cannot_bind_is_one_line(capsys):
    code, err = _rkv(capsys, "serve", "--host", "192.0.2.1", "--port", "0")  # TEST-NET, not ours
    assert code == 2 and _one_line(err).startswith("rkv serve: cannot bind 192.0.2.1:0")


def test_serve_refuses_malformed_tenant_tokens(capsys, monkeypatch):
    monkeypatch.setenv("RKV_TOKENS", "short=a")
    code, err = _rkv(capsys, "serve", "--port", "0")
    assert code == 2 and "shorter than 8" in _one_line(err)
    monkeypatch.setenv("RKV_TOKENS", "no-equals-sign")
    code, err = _rkv(capsys, "serve", "--port", "0")
    assert code == 2 and "TOKEN=TENANT" in _one_line(err)


def test_check_refuses_missing_paths_fifos_and_deep_nesting(capsys, tmp_path):
    code, err = _rkv(capsys, "check", "--all", "--suites", "/nonexistent")
    assert code == 2 and _one_line(err) == "rkv check: /nonexistent: no such file or directory"
    fifo = tmp_path / "events.fifo"
    os.mkfifo(fifo)
    descriptor = tmp_path / "d.json"
    descriptor.write_text("{}")
    code, err = _rkv(capsys, "check", str(descriptor), "--events", str(fifo))
    assert code == 2 and "not a regular file" in _one_line(err)
    code, err = _rkv(capsys, "check", str(tmp_path))
    assert code == 2 and "is a directory" in _one_line(err)
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 100_000 + "]" * 100_000)
    deep_toml = tmp_path / "deep.toml"
    deep_toml.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    for path in (deep_json, deep_toml):
        code, err = _rkv(capsys, "check", str(path))
        assert code == 2, (path, err)
        _one_line(err)


def test_matrix_and_verify_refuse_missing_paths(capsys, tmp_path):
    code, err = _rkv(capsys, "matrix", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert code == 2 and "no such file or directory" in _one_line(err)
    assert not (tmp_path / "out").exists()
    code, err = _rkv(capsys, "verify", str(tmp_path / "nope"))
    assert code == 2 and "not a bundle directory" in _one_line(err)


@pytest.mark.parametrize("option, words", [
    ("--rkv-url=not-a-url", "not an http:// or https:// URL"),
    ("--rkv-url=ftp://host", "not an http:// or https:// URL"),
    ("--rkv-url=http://host:99999", "bad port"),
    ("--rkv-url=http://user:pw@host", "no credentials"),
    ("--rkv-startup-timeout=-1", "finite number of seconds > 0"),
    ("--rkv-startup-timeout=nan", "finite number of seconds > 0"),
    ("--rkv-startup-timeout=inf", "finite number of seconds > 0"),
    ("--rkv-startup-timeout=0", "finite number of seconds > 0"),
])
def test_plugin_options_are_checked_at_start(run_suites, option, words):
    run = run_suites("--rkv-backend=reference", option)
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    assert words in run.result.stderr.str()
    assert not run.report_dir.exists()


def test_an_unwritable_report_dir_is_a_usage_error(run_suites, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    run = run_suites("--rkv-backend=reference", "--rkv-report-dir", str(blocker / "rows"))
    assert run.result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is not a directory" in run.result.stderr.str()
    assert blocker.read_text() == "not a directory"


def test_tokens_given_as_options_never_reach_a_bundle(run_suites):
    secret = "tok-" + "s3cr3t" * 4
    run = run_suites("--rkv-backend=reference", f"--rkv-tenant-tokens={secret},other-{secret}",
                     f"--rkv-admin-token=admin-{secret}", "-k", "identity", subprocess=True)
    assert run.report_dir.exists()
    for path in run.report_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), f"{path} holds a token"


def test_rkv_serve_process_prints_one_line_and_exits_2():
    proc = subprocess.run([sys.executable, "-m", "pytest_rkv.cli", "serve", "--claim-budget", "-3"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") <= 1
