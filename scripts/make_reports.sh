#!/usr/bin/env bash
# Regenerate reports/: certified runs of every backend this machine can run, each bundle
# verified independently, then the matrix (with the static descriptor rows when present).
# Usage: bash scripts/make_reports.sh [backends]   (default: every backend runnable here)
set -euo pipefail
cd "$(dirname "$0")/.."
backends="${1:-reference,reference-http,vllm}"
bundles=reports/bundles
rm -rf "$bundles"
# A failed obligation is evidence, not an error here: the verifier and the labels decide.
python -m pytest suites --rkv-certify --rkv-backend="$backends" --rkv-report-dir "$bundles" \
  -q -p no:cacheprovider || true
status=0
for bundle in "$bundles"/*/; do
  python -m pytest_rkv.cli verify "$bundle" || status=1
done
python -m pytest_rkv.cli matrix "$bundles"/*/ --out reports
exit $status
