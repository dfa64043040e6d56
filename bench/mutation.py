"""Mutation score of `suites/` against the reference runtime's claim logic, in one command.

    python bench/mutation.py [--workdir DIR] [--max-children N] [--json OUT]

What it does:
1. copies this checkout's files (tracked and new, as they are on disk) to a scratch
   directory and adds a `[tool.mutmut]` section to the copy's pyproject.toml;
2. runs the released suite once, unmutated, on the `reference` backend and records every
   test's outcome (the baseline: it must be all passed except the declared
   unsupported/inapplicable ones);
3. runs mutmut 3.8.1 over `pytest_rkv/reference/runtime.py` and `pool.py`, with the suite
   as the test command and `mutation_gate.py` loaded, so a mutant counts as killed when
   any test's outcome differs from the baseline (not only when pytest exits non-zero);
4. prints killed / total, the score over non-equivalent mutants, and each survivor with
   its diff and its verdict. Verdicts come from `mutation_verdicts.txt`, one
   `regex  # verdict` per line, the regex searched in the mutant's name and changed lines
   (first match wins): a verdict that starts with "equivalent" takes the mutant out of
   the denominator; any other verdict ("gap: ...") names what the suite does not check.

Needs mutmut==3.8.1 in the running interpreter's environment (it is not a project
dependency: `pip install mutmut==3.8.1`). Takes minutes; run it under `nice`.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
VERDICTS = BENCH / "mutation_verdicts.txt"
MUTATED = ["pytest_rkv/reference/runtime.py", "pytest_rkv/reference/pool.py"]
# Not tenants.py: token parsing and bearer checks run only behind `rkv serve`; the in-process
# reference backend never reaches them (tests/reference/test_reference_server.py does).
SUITE_ARGS = ["--rkv-backend=reference", "-p", "no:cacheprovider", "-p", "mutation_gate"]

MUTMUT_CONFIG = """
[tool.mutmut]
source_paths = ["pytest_rkv"]
only_mutate = {only}
pytest_add_cli_args = {args}
pytest_add_cli_args_test_selection = ["suites"]
also_copy = ["suites", "backends"]
"""


def copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


# -- fault-mode code -------------------------------------------------------------------
# The reference runtime's fault modes (`FAULT_MODES`) sit in the claim logic as branches
# taken only when a fault is switched on. The released suite runs the runtime with no
# fault, so a mutant inside such a branch cannot change any outcome: it is equivalent for
# this measure (tests/reference/test_fault_modes.py is what exercises those branches). They are
# found from the syntax tree, never by hand.

FAULT_ONLY_DEFS = {"park_forever", "Parked",  # exist only for the queue_blocked_requests fault
                   "_distort"}  # exists only for the event-content faults


def _requires_fault(test: ast.AST) -> bool:
    """Whether `test` can be true only with some fault mode on (`"x" in self.faults`,
    combined by `and` with anything, or by `or` with more such tests)."""
    if isinstance(test, ast.Compare):
        return [type(op) for op in test.ops] == [ast.In] and "faults" in ast.unparse(test.comparators[0])
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return any(_requires_fault(v) for v in test.values)
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
        return all(_requires_fault(v) for v in test.values)
    return False


def fault_only_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions, as (line, col), of code that runs only under a fault mode."""
    spans = []

    def span(first: ast.AST, last: ast.AST | None = None) -> None:
        last = last or first
        spans.append(((first.lineno, first.col_offset), (last.end_lineno, last.end_col_offset)))

    tree = ast.parse(source)
    fault_names: set[str] = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and any(getattr(t, "id", None) == "FAULT_MODES" for t in targets):
            fault_names = {k.value for k in node.value.keys}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in FAULT_ONLY_DEFS:
            span(node)
        elif isinstance(node, ast.If) and _requires_fault(node.test):
            span(node.body[0], node.body[-1])
        elif isinstance(node, ast.IfExp) and _requires_fault(node.test):
            span(node.body)
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.And) and _requires_fault(node.values[0]):
            span(node.values[1], node.values[-1])
        elif isinstance(node, ast.Constant) and node.value in fault_names:
            span(node)
    return spans


def _definition(tree: ast.Module, name: str) -> ast.AST | None:
    """The def a mutmut name points at: `mod.x_func__mutmut_3` or `mod.xǁClassǁmethod__mutmut_3`."""
    short = name.rsplit(".", 1)[1].rsplit("__mutmut_", 1)[0]
    cls, _, func = short[1:].partition("ǁ")[2].partition("ǁ") if short.startswith("xǁ") else ("", "", short[2:])
    scope = tree.body
    if cls:
        scope = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), [])
    return next((n for n in scope if isinstance(n, ast.FunctionDef) and n.name == func), None)


def is_fault_only(name: str, diff: str, sources: dict[str, str]) -> bool:
    """Whether the first line this mutant changes lies, at the changed columns, in fault-mode code."""
    module = name.rsplit(".", 1)[0]
    source = sources.get(module)
    hunk = re.search(r"^@@ -(\d+)", diff, re.MULTILINE)
    if source is None or hunk is None:
        return False
    func = _definition(ast.parse(source), name)
    if func is None:
        return False
    line_in_func, old, new = int(hunk.group(1)), None, None
    for line in diff[hunk.end():].splitlines()[1:]:
        if line.startswith("-") and old is None:
            old = line[1:]
        elif line.startswith("+") and old is not None:
            new = line[1:]
            break
        elif old is None and line.startswith(" "):
            line_in_func += 1
    if old is None or new is None:
        return False
    # mutmut prints the function as it re-renders it, which can differ from the file by a
    # line or two: take the matching line of the def nearest to where the hunk says
    lines = source.splitlines()
    guess = func.lineno + line_in_func - 1
    matches = [n for n in range(func.lineno, func.end_lineno + 1) if lines[n - 1].strip() == old.strip()]
    if not matches:
        return False
    lineno = min(matches, key=lambda n: abs(n - guess))
    file_line = lines[lineno - 1]
    shift = (len(file_line) - len(file_line.lstrip())) - (len(old) - len(old.lstrip()))
    ops = [op for op in difflib.SequenceMatcher(None, old, new).get_opcodes() if op[0] != "equal"]
    first, last = ops[0][1] + shift, max(ops[-1][2] + shift - 1, ops[0][1] + shift)
    return any(start <= (lineno, first) and (lineno, last) < end for start, end in fault_only_spans(source))


def mutant_diffs(work: Path) -> dict[str, str]:
    """Every mutant's diff against its original function, read from mutmut's generated
    `mutants/` sources (one parse per file, instead of one `mutmut show` process each)."""
    diffs: dict[str, str] = {}
    for rel in MUTATED:
        text = (work / "mutants" / rel).read_text()
        lines_of_file = text.splitlines()
        module = rel[:-3].replace("/", ".")
        funcs = {n.name: n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and "__mutmut_" in n.name}
        for name, node in funcs.items():
            base, _, tag = name.rpartition("__mutmut_")
            orig = funcs.get(f"{base}__mutmut_orig")
            if tag == "orig" or orig is None:
                continue

            def body(n: ast.FunctionDef) -> list[str]:
                lines = textwrap.dedent("\n".join(lines_of_file[n.lineno - 1:n.end_lineno])).splitlines()
                return [re.sub(r"^def \S+?\(", "def f(", lines[0]), *lines[1:]]

            diffs[f"{module}.{name}"] = "\n".join(difflib.unified_diff(body(orig), body(node), rel, rel, lineterm=""))
    return diffs


def load_verdicts() -> list[tuple[re.Pattern[str], str]]:
    rules: list[tuple[re.Pattern[str], str]] = []
    if VERDICTS.exists():
        for line in VERDICTS.read_text().splitlines():
            pattern, sep, verdict = line.partition("  # ")
            if pattern.strip() and not pattern.startswith("#") and sep:
                rules.append((re.compile(pattern.strip(), re.MULTILINE), verdict.strip()))
    return rules


def verdict_for(name: str, diff: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    changed = "\n".join(line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    subject = f"{name}\n{changed}"
    return next((verdict for pattern, verdict in rules if pattern.search(subject)), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a new temp dir, kept)")
    ap.add_argument("--max-children", type=int, default=1)
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rkv-mutation-"))
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        sys.exit(f"{work} is not empty; give a new --workdir")
    copy_checkout(work)
    suite_args = SUITE_ARGS
    with open(work / "pyproject.toml", "a") as f:
        f.write(MUTMUT_CONFIG.format(only=json.dumps([f"*{m}" for m in MUTATED]), args=json.dumps(suite_args)))
    # Each pytest process writes its bundle under its own folder (mutation_gate.py): mutmut's
    # children run at once, and two runs sharing one bundle folder would empty each other's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")])),
           "RKV_MUTATION_REPORTS": str(work / "mutation-reports")}

    baseline = work / "baseline-outcomes.json"
    base = subprocess.run([sys.executable, "-m", "pytest", "suites", "-q", *suite_args],
                          cwd=work, env={**env, "RKV_MUTATION_RECORD": str(baseline)})
    outcomes = json.loads(baseline.read_text())
    print(f"baseline: exit {base.returncode}, outcomes {sorted(set(outcomes.values()))}")
    if base.returncode != 0 or set(outcomes.values()) - {"passed", "unsupported", "not_applicable"}:
        sys.exit("the unmutated suite is not clean on the reference backend; fix that first")

    mutmut = [sys.executable, "-m", "mutmut"]
    subprocess.run([*mutmut, "run", "--max-children", str(args.max_children)], cwd=work,
                   env={**env, "RKV_MUTATION_BASELINE": str(baseline)}, check=False)
    listing = subprocess.run([*mutmut, "results", "--all", "true"], cwd=work, env=env,
                             capture_output=True, text=True, check=True).stdout
    status = dict(re.findall(r"^\s+(\S+): (\w[\w ]*)$", listing, re.MULTILINE))
    sources = {m[:-3].replace("/", "."): (work / m).read_text() for m in MUTATED}
    rules = load_verdicts()
    killed = [n for n, s in status.items() if s in ("killed", "timeout")]
    every_diff = mutant_diffs(work)
    diffs = {n: every_diff.get(n, "") for n, s in status.items() if s not in ("killed", "timeout")}
    fault_only = sorted(n for n, d in diffs.items() if is_fault_only(n, d, sources))
    verdicts = {n: verdict_for(n, d, rules) for n, d in diffs.items() if n not in fault_only}
    listed = sorted(n for n, v in verdicts.items() if v and v.startswith("equivalent"))
    survivors = sorted(n for n in verdicts if n not in listed)
    total = len(status)
    equiv = len(fault_only) + len(listed)
    score = len(killed) / max(1, total - equiv)
    print(f"\nmutants {total}: killed {len(killed)}, fault-mode-only {len(fault_only)}, "
          f"listed equivalent {len(listed)}, other survivors {len(survivors)}")
    print(f"raw score {len(killed)}/{total} = {len(killed) / max(1, total):.1%}; "
          f"score over non-equivalent {len(killed)}/{total - equiv} = {score:.1%}")
    unexplained = [n for n in survivors if not verdicts[n]]
    print(f"survivors with a verdict {len(survivors) - len(unexplained)}, without {len(unexplained)}")
    for name in [*listed, *survivors]:
        print(f"\n## {name}: {status[name]} -- {verdicts[name] or 'NO VERDICT'}\n{diffs[name]}")
    if args.json:
        args.json.write_text(json.dumps({
            "workdir": str(work), "total": total, "killed": len(killed), "fault_only": fault_only,
            "equivalent": {n: verdicts[n] for n in listed}, "score": score, "status": status,
            "survivors": {n: {"verdict": verdicts[n], "diff": diffs[n]} for n in survivors},
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
