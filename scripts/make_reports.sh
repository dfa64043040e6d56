#!/usr/bin/env bash
# Regenerate reports/: certified runs of every backend this machine can run, each bundle
# verified independently, then the matrix (with the static descriptor rows when present).
# Usage: bash scripts/make_reports.sh [backends]   (default: every backend runnable here)
set -euo pipefail
cd "$(dirname "$0")/.."
backends="${1:-reference,reference-http,vllm,vllm+rkv,vllm+lmcache,vllm+rkv+lmcache,sglang,dynamo,dynamo+rkv}"
bundles=reports/bundles
rm -rf "$bundles"
# A failed obligation is evidence, not an error here: the verifier and the labels decide.
# The run's own output goes to a log, so this script's output ends with the verdicts.
mkdir -p "$bundles"
python -m pytest --rkv-certify --rkv-backend="$backends" --rkv-report-dir "$bundles" --rkv-startup-timeout 900 \
  -q -p no:cacheprovider > "$bundles/run.log" 2>&1 || true
grep -A 30 "resident KV claims: rows" "$bundles/run.log" | grep -E "^[a-z].*\(.*depth" || true
status=0
for bundle in "$bundles"/*/; do
  python -m pytest_rkv.cli verify "$bundle" || status=1
done
python -m pytest_rkv.cli matrix "$bundles"/*/ backends/ --evidence-dir "$bundles" --out reports
exit $status
