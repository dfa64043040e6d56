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
4. prints killed / total, the score over non-equivalent mutants (the equivalent ones are
   listed in `mutation_equivalent.txt`, one `name  # verdict` per line), and each
   survivor with its diff.

Needs mutmut==3.8.1 in the running interpreter's environment (it is not a project
dependency: `pip install mutmut==3.8.1`). Takes minutes; run it under `nice`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
EQUIVALENT = BENCH / "mutation_equivalent.txt"
MUTATED = ["pytest_rkv/reference/runtime.py", "pytest_rkv/reference/pool.py"]
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


def load_equivalent() -> dict[str, str]:
    found: dict[str, str] = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            name, _, verdict = line.partition("#")
            if name.strip():
                found[name.strip()] = verdict.strip()
    return found


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
    report_dir = work / "mutation-report"
    suite_args = [*SUITE_ARGS, "--rkv-report-dir", str(report_dir)]
    with open(work / "pyproject.toml", "a") as f:
        f.write(MUTMUT_CONFIG.format(only=json.dumps([f"*{m}" for m in MUTATED]), args=json.dumps(suite_args)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))}

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
    equivalent = load_equivalent()
    killed = [n for n, s in status.items() if s in ("killed", "timeout")]
    equiv = [n for n, s in status.items() if n in equivalent and s not in ("killed", "timeout")]
    survivors = sorted(n for n, s in status.items() if s not in ("killed", "timeout") and n not in equivalent)
    total = len(status)
    score = len(killed) / max(1, total - len(equiv))
    print(f"\nmutants {total}: killed {len(killed)}, equivalent {len(equiv)}, other survivors {len(survivors)}")
    print(f"raw score {len(killed)}/{total} = {len(killed) / max(1, total):.1%}; "
          f"score over non-equivalent {len(killed)}/{total - len(equiv)} = {score:.1%}")
    diffs = {}
    for name in survivors:
        diffs[name] = subprocess.run([*mutmut, "show", name], cwd=work, env=env,
                                     capture_output=True, text=True).stdout
        print(f"\n## {name}: {status[name]}\n{diffs[name]}")
    if args.json:
        args.json.write_text(json.dumps({
            "workdir": str(work), "total": total, "killed": len(killed), "equivalent": len(equiv),
            "score": score, "status": status, "survivors": diffs,
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
