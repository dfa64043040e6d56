#!/usr/bin/env bash
# The package as a vendor gets it: build the sdist and wheel, check their metadata, install
# the wheel alone into a fresh venv (no checkout on the path), and from an empty directory
# run the released suite, verify the bundle, check the installed descriptors and list the
# backends. Then, in the same venv (plus the dev extra, no runtime), the repository's own
# tests must collect cleanly and selecting a runtime that is absent must be a usage error.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python -m build --sdist --wheel --outdir "$work/dist" . > "$work/build.log" 2>&1 || { tail -30 "$work/build.log"; exit 1; }
python -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/*.whl)
python - "$wheel" <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
needed = ["pytest_rkv/suite/test_claims.py", "pytest_rkv/descriptors/vllm/vllm.toml", "pytest_rkv/suite_manifest.json"]
missing = [n for n in needed if n not in names]
sys.exit(f"check_package: not in the wheel: {missing}" if missing else 0)
PY

python -m venv "$work/venv"
venv="$work/venv/bin"
"$venv/python" -m pip install -q "$wheel" 2> "$work/pip.log" || { tail -20 "$work/pip.log"; exit 1; }
mkdir "$work/empty"
cd "$work/empty"
"$venv/pytest" --rkv-certify --rkv-backend=reference --rkv-report-dir "$work/report" -q -p no:cacheprovider | tail -3
"$venv/python" - "$work/report/reference/row.json" <<'PY'
import json, sys
row = json.load(open(sys.argv[1]))
assert row["label"] == "native conformance", row["label"]
print("wheel-only row:", row["label"])
PY
"$venv/rkv" verify "$work/report/reference" | tail -1
"$venv/rkv" check --all > /dev/null
"$venv/rkv" backends
[ -z "$(ls -A "$work/empty")" ] || { echo "check_package: the run wrote into the invocation directory: $(ls -A)" >&2; exit 1; }

# A dev-only install: no runtime. Self-tests collect; a runtime backend is a usage error.
"$venv/python" -m pip install -q "$wheel[dev]" 2> "$work/pip.log" || { tail -20 "$work/pip.log"; exit 1; }
cd "$repo"
"$venv/python" -m pytest --collect-only -q -p no:cacheprovider > "$work/collect.log" 2>&1 \
  || { tail -30 "$work/collect.log"; echo "check_package: the self-tests do not collect on a dev-only install" >&2; exit 1; }
tail -1 "$work/collect.log"
set +e
"$venv/python" -m pytest --rkv-backend=vllm -p no:cacheprovider --rkv-report-dir "$work/vllm" > "$work/vllm.log" 2>&1
rc=$?
set -e
if [ "$rc" -ne 4 ] || ! grep -q "pytest-rkv\[vllm" "$work/vllm.log"; then
  cat "$work/vllm.log"; echo "check_package: --rkv-backend=vllm without vLLM must be a usage error naming the extra (exit $rc)" >&2; exit 1
fi
grep -m1 "rkv-backend" "$work/vllm.log"
echo "check_package: OK"
