"""`rkv`: thin commands over the library.

    rkv serve           run the reference runtime as an RKV API v1 server (loopback)
    rkv check           label lowering descriptors against anchors and run evidence
    rkv verify          check an evidence bundle, independently of the run
    rkv matrix          render the conformance matrix (Markdown and HTML)
    rkv backends        list the installed backends (built-in and vendors')
    rkv catalogue       print the obligation catalogue (Markdown)
    rkv openapi         print the OpenAPI document of RKV API v1
    rkv suite-manifest  hash the suite into the released manifest
"""

from __future__ import annotations

import argparse
import json
import sys


def _serve(args: argparse.Namespace) -> int:
    from pytest_rkv.reference.runtime import FAULT_MODES, MicroRuntime
    from pytest_rkv.reference.server import serve
    from pytest_rkv.reference.tenants import Tenancy

    try:
        tenancy = Tenancy.from_env()
        if args.admin_token_file:
            tenancy = Tenancy(tenancy.tokens, _read_secret(args.admin_token_file))
        runtime = MicroRuntime(
            num_blocks=args.blocks, block_size=args.block_size,
            claim_budget_blocks=args.claim_budget, host_blocks=args.host_blocks,
            faults=frozenset(args.fault),
            fault_injection=tenancy.admin_token is not None and not args.no_fault_injection,
            tenancy=tenancy.enabled,
            tenant_budget_blocks=args.tenant_budget if tenancy.enabled else None,
        )
        server = serve(runtime, args.host, args.port, tenancy)
    except (ValueError, OSError) as exc:
        print(f"rkv serve: {_one_line(exc, args)}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    faults = f" with fault modes {', '.join(sorted(args.fault))}" if args.fault else ""
    url_host = f"[{host}]" if ":" in host else host
    print(f"RKV API v1 listening on http://{url_host}:{port}{faults}", flush=True)
    if tenancy.enabled:
        print(f"  tenants: {', '.join(tenancy.tenants)} (budget {args.tenant_budget} blocks each)", flush=True)
    print(f"  admin routes (reset, faults): {'on' if tenancy.admin_token else 'off (no admin token)'}", flush=True)
    if args.fault:
        for f in args.fault:
            print(f"  fault {f}: {FAULT_MODES[f]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _one_line(exc: Exception, args: argparse.Namespace) -> str:
    """A bind or configuration error as one sentence naming what to change."""
    import errno

    if isinstance(exc, OSError):
        if exc.errno == errno.EADDRINUSE:
            return f"port {args.port} on {args.host} is already in use; pick another, or --port 0 for a free one"
        return f"cannot bind {args.host}:{args.port}: {exc.strerror or exc}"
    return " ".join(str(exc).split())


def _read_secret(path: str) -> str:
    from pathlib import Path

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{path}: not a regular file")
    return file.read_text().strip()


def _count(least: int):
    """An argparse type: an integer >= least, with a one-line error otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is below {least}")
        return value
    parse.__name__ = f"integer >= {least}"
    return parse


def _port(text: str) -> int:
    value = _count(0)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port (0..65535)")
    return value


def _host(text: str) -> str:
    import ipaddress
    import re

    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,252})", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or host name")
    return text


def _catalogue(args: argparse.Namespace) -> int:
    from pytest_rkv.docs import catalogue_markdown

    print(catalogue_markdown())
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from pytest_rkv.reference.server import openapi

    print(json.dumps(openapi(), indent=2))
    return 0


def _suite_manifest(args: argparse.Namespace) -> int:
    import ast
    from pathlib import Path

    from pytest_rkv.certify import MANIFEST, manifest_for
    from pytest_rkv.contract import SUITE_VERSION

    from pytest_rkv.locations import suite_dir as released_suite

    suite_dir = Path(args.suite_dir).resolve() if args.suite_dir else released_suite()
    manifest = manifest_for(suite_dir, SUITE_VERSION)
    manifest["tests"] = sorted(
        f"{path.name}::{node.name}"
        for path in sorted(suite_dir.glob("test_*.py"))
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
    )
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    if args.check:
        if MANIFEST.read_text() != text:
            print(f"{MANIFEST} is out of date with {suite_dir}; run `rkv suite-manifest`", file=sys.stderr)
            return 1
        print(f"{MANIFEST} matches {suite_dir}")
        return 0
    MANIFEST.write_text(text)
    print(f"wrote {MANIFEST}: suite {SUITE_VERSION}, {len(manifest['files'])} files, {len(manifest['tests'])} tests")
    return 0


def _backends(args: argparse.Namespace) -> int:
    """Every installed backend: its id, depth, where it comes from, and whether it can run."""
    from pytest_rkv.drivers.registry import BackendUnavailable, UnknownBackend, driver_class, installed

    backends = installed()
    width = max((len(b) for b in backends), default=7)
    for backend in backends.values():
        try:
            cls = driver_class(backend.id)
        except (BackendUnavailable, UnknownBackend) as exc:
            status = f"unavailable: {exc}"
        else:
            status = f"depth {cls.depth}" + (", routed" if cls.routed else "")
        print(f"{backend.id:<{width}}  {status}  [{backend.distribution} {backend.version}: {backend.target}]")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pytest_rkv.verify import verify

    bundle = Path(args.bundle)
    if bundle.is_symlink() or not bundle.is_dir():
        print(f"rkv verify: {bundle} is not a bundle directory", file=sys.stderr)
        return 2
    checks = verify(bundle, replay=not args.no_replay)
    for check in checks:
        print(check.line())
    failed = [c for c in checks if not c.ok]
    print(f"{bundle}: {'NOT VERIFIED' if failed else 'verified'} ({len(checks) - len(failed)}/{len(checks)} checks passed)")
    return 1 if failed else 0


def _matrix(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pytest_rkv.checker import check_file
    from pytest_rkv.descriptor import descriptor_files, load_descriptor, load_evidence
    from pytest_rkv.evidence import EvidenceError, read_row
    from pytest_rkv.matrix import html_page, markdown, runtime_rows

    bundles, files = [], []
    problem = _path_problem(args.evidence_dir, "dir")
    if problem:
        print(f"rkv matrix: {problem}", file=sys.stderr)
        return 2
    for given in args.paths:
        path = Path(given)
        problem = _path_problem(given, "any")
        if problem:
            print(f"rkv matrix: {problem}", file=sys.stderr)
            return 2
        if (path / "row.json").exists() or path.name == "row.json":
            bundles.append(path.parent if path.name == "row.json" else path)
        elif path.suffix in (".toml", ".json") or path.is_dir() and descriptor_files(path):
            files += [path] if path.is_file() else descriptor_files(path)
        else:
            print(f"rkv matrix: {path} is neither a bundle (a directory with row.json), a row.json, "
                  "nor a descriptor (.toml/.json, or a directory of them)", file=sys.stderr)
            return 2
    try:
        by_backend = {read_row(b).backend: b for b in bundles}
        checks = []
        for file in files:
            check = check_file(file, evidence_dir=args.evidence_dir)
            if check.malformed:
                print(f"rkv matrix: {check.reason}", file=sys.stderr)
                return 2
            backend = load_descriptor(file).backend
            if backend in by_backend:  # judged on the very evidence its row shows
                check = check_file(file, load_evidence(by_backend[backend] / "row.json"))
            checks.append(check)
        rows = runtime_rows(bundles, checks)
    except EvidenceError as exc:
        print(f"rkv matrix: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.md").write_text(markdown(rows))
    (out / "matrix.html").write_text(html_page(rows, base=out))
    print(f"wrote {out / 'matrix.md'} and {out / 'matrix.html'} ({len(rows)} rows, one per runtime)")
    return 0


def _check(args: argparse.Namespace) -> int:
    """Label descriptors against their anchors and any run evidence (docs/lowering.md).
    Exit 2 on a malformed descriptor; for one descriptor, 1 on a rejected mapping."""
    from pathlib import Path

    from pytest_rkv.descriptor import SuiteCatalogue, descriptor_files, load_evidence
    from pytest_rkv.checker import Label, check_file
    from pytest_rkv.matrix import render_check, render_matrix

    problem = (_path_problem(args.suites, "dir") or _path_problem(args.evidence_dir, "dir")
               or _path_problem(args.source_root, "dir") or _path_problem(args.all or None, "dir")
               or _path_problem(args.descriptor, "file") or _path_problem(args.evidence, "file")
               or _path_problem(args.events, "file"))
    if problem:
        print(f"rkv check: {problem}", file=sys.stderr)
        return 2
    catalogue = SuiteCatalogue.scan(args.suites) if args.suites else SuiteCatalogue.default()
    options = dict(evidence_dir=args.evidence_dir, catalogue=catalogue,
                   source_root=Path(args.source_root) if args.source_root else None)
    if args.all is not None:
        from pytest_rkv.locations import descriptors_dir

        args.all = args.all or str(descriptors_dir())
        files = descriptor_files(args.all)
        if not files:
            print(f"rkv check: no .toml or .json descriptors under {args.all}", file=sys.stderr)
            return 2
        rows = [check_file(path, **options) for path in files]
        print(render_matrix(rows))
        for row in rows:
            if row.malformed:
                print(f"rkv check: {row.reason}", file=sys.stderr)
        return 2 if any(row.malformed for row in rows) else 0
    if not args.descriptor:
        print("rkv check: name a DESCRIPTOR, or --all DIR", file=sys.stderr)
        return 2
    evidence = load_evidence(args.evidence, args.events) if (args.evidence or args.events) else None
    row = check_file(args.descriptor, evidence, **options)
    if row.malformed:
        print(f"rkv check: {row.reason}", file=sys.stderr)
        return 2
    print(render_check(row))
    return 1 if row.label == Label.REJECTED else 0


def _path_problem(given: str | None, kind: str) -> str | None:
    """Why `given` cannot be read as a `kind` ("file", "dir" or "any"); None if it can, or
    if nothing was given. A FIFO or device is refused: reading it could block forever."""
    if given is None:
        return None
    from pathlib import Path

    path = Path(given)
    if not path.exists():
        return f"{given}: no such file or directory"
    if path.is_dir():
        return None if kind in ("dir", "any") else f"{given}: is a directory, expected a file"
    if not path.is_file():
        return f"{given}: not a regular file (a FIFO, socket or device cannot be read safely)"
    return None if kind in ("file", "any") else f"{given}: is a file, expected a directory"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (the usage block is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="rkv", description="pytest-rkv: Resident KV Claims conformance")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the reference runtime over HTTP")
    s.add_argument("--host", type=_host, default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=_port, default=8400, help="port; 0 picks a free one")
    s.add_argument("--blocks", type=_count(1), default=80, help="usable blocks in the pool")
    s.add_argument("--block-size", type=_count(1), default=16, help="tokens per block")
    s.add_argument("--claim-budget", type=_count(0), default=64, help="blocks all claims may hold together")
    s.add_argument("--host-blocks", type=_count(0), default=80, help="host tier size for demotion (0: none)")
    s.add_argument("--tenant-budget", type=_count(1), default=60,
                   help="blocks one tenant's claims may hold together (with tenants; default 60)")
    s.add_argument("--admin-token-file", metavar="FILE",
                   help="file holding the admin token (else $RKV_ADMIN_TOKEN); without one, reset and "
                        "faults are off. Tenants come from $RKV_TOKENS as TOKEN=TENANT,...")
    from pytest_rkv.reference.runtime import FAULT_MODES

    s.add_argument("--fault", action="append", default=[], choices=sorted(FAULT_MODES), metavar="MODE",
                   help="break one obligation on purpose (repeatable): " + ", ".join(sorted(FAULT_MODES)))
    s.add_argument("--no-fault-injection", action="store_true",
                   help="disable POST /v1/kv/faults even with an admin token")
    s.set_defaults(func=_serve)

    sub.add_parser("catalogue", help="print the obligation catalogue").set_defaults(func=_catalogue)
    sub.add_parser("backends", help="list the installed backends (built-in and vendors')").set_defaults(func=_backends)

    m = sub.add_parser("suite-manifest", help="hash the suite into the package's suite_manifest.json")
    m.add_argument("suite_dir", nargs="?", help="the suite directory (default: the released suite, suites/ in a checkout)")
    m.add_argument("--check", action="store_true", help="only check that the manifest is up to date")
    m.set_defaults(func=_suite_manifest)

    x = sub.add_parser("matrix", help="render the conformance matrix (Markdown and HTML)")
    x.add_argument("paths", nargs="+", help="bundle directories, row.json files, or descriptors (files or directories)")
    x.add_argument("--evidence-dir", metavar="DIR", help="where descriptors find their run evidence (<backend>/row.json)")
    x.add_argument("--out", default="reports", help="output directory (default: reports)")
    x.set_defaults(func=_matrix)

    v = sub.add_parser("verify", help="check an evidence bundle, independently of the run")
    v.add_argument("bundle", help="a bundle directory: <report-dir>/<backend>")
    v.add_argument("--no-replay", action="store_true",
                   help="skip re-running the suite on the transcript (the bundle is then NOT VERIFIED)")
    v.set_defaults(func=_verify)
    c = sub.add_parser("check", help="label lowering descriptors against anchors and run evidence")
    c.add_argument("descriptor", nargs="?", help="a descriptor file (.toml or .json)")
    c.add_argument("--evidence", metavar="ROW_JSON", help="the row.json of a run (events.jsonl beside it is used)")
    c.add_argument("--events", metavar="EVENTS_JSONL", help="the run's event trace, if not beside the row")
    c.add_argument("--all", metavar="DIR", nargs="?", const="", default=None,
                   help="check every descriptor under DIR (default: the installed descriptors) and print the matrix")
    c.add_argument("--evidence-dir", metavar="DIR", help="where <backend>/row.json bundles live (rkv-report)")
    c.add_argument("--suites", metavar="DIR", help="the suite directory (default: the released suite)")
    c.add_argument("--source-root", metavar="DIR", help="a checkout of the runtime: source anchors must exist in it")
    c.set_defaults(func=_check)
    sub.add_parser("openapi", help="print the OpenAPI document").set_defaults(func=_openapi)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RecursionError:  # a deeply nested TOML or JSON document
        print(f"rkv {args.command}: an input file is nested too deeply to read", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `rkv backends | head`: the reader left, which is not an error
        sys.stderr.close()  # so the interpreter's own flush at exit does not complain again
        return 0


if __name__ == "__main__":
    sys.exit(main())
