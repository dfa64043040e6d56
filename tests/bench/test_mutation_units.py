"""bench/mutation.py's pure parts: which mutants are fault-mode-only, and which verdict a
survivor gets (no mutmut run here)."""

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("rkv_bench_mutation", BENCH / "mutation.py")
mutation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation)

DIFF = """--- a.py
+++ a.py
@@ -1,3 +1,3 @@
 def f(self):
-    message = "claim not admitted"
+    message = "XXclaim not admittedXX"
"""


def test_a_verdict_matches_the_name_or_the_changed_lines_first_rule_wins():
    rules = [(re.compile(r"XX.*XX"), "equivalent: free text"), (re.compile(r"_refusal"), "gap: arithmetic")]
    assert mutation.verdict_for("m.x_refusal__mutmut_3", DIFF, rules) == "equivalent: free text"
    plain = DIFF.replace("XXclaim not admittedXX", "claim")
    assert mutation.verdict_for("m.x_refusal__mutmut_3", plain, rules) == "gap: arithmetic"
    assert mutation.verdict_for("m.other__mutmut_1", plain, rules) is None
    # the unchanged context lines and the file header are not searched
    assert mutation.verdict_for("m.f", DIFF.replace("XXclaim not admittedXX", "x"), [(re.compile("a.py"), "v")]) is None


def test_the_released_verdict_file_parses_and_every_rule_compiles():
    rules = mutation.load_verdicts()
    assert rules, "bench/mutation_verdicts.txt holds the survivors' verdicts"
    assert all(v.startswith(("equivalent", "gap")) for _, v in rules)


def test_code_under_a_fault_test_is_fault_only():
    source = 'FAULT_MODES = {"x": "o: d"}\ndef g(self):\n    if "x" in self.faults:\n        a = 1\n    b = 2\n'
    spans = mutation.fault_only_spans(source)
    inside = [(s, e) for s, e in spans if s <= (4, 8) < e]
    assert inside and not [(s, e) for s, e in spans if s <= (5, 4) < e]
