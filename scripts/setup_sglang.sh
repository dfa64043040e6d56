#!/usr/bin/env bash
# SGLang 0.5.23 on CPU, in its own venv (SGLang and vLLM pin different dependency versions).
# Default location: .venvs/sglang (git-ignored); override with RKV_SGLANG_VENV. The driver
# finds it there, or through RKV_SGLANG_PYTHON (see pytest_rkv/drivers/sglang/environment.py).
# On a GPU runner install upstream `sglang` in an environment of its own instead and point
# RKV_SGLANG_PYTHON at its python (docs/CONFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RKV_SGLANG_VENV:-.venvs/sglang}"
python -m venv "$venv"
# --no-compile: byte-compiling all of torch, SGLang and transformers costs minutes of CPU;
# Python compiles just the modules it imports, on first use.
pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile)
# The CPU torch from the machine's wheel store (SGLang pins a CUDA 2.14.1; 2.13 works).
"${pip[@]}" torch==2.13.0
# SGLang without its CUDA dependencies; triton is imported unconditionally.
"${pip[@]}" --no-deps sglang==0.5.23 triton==3.8.0 torchvision==0.28.0
# The pure-Python closure, pinned as measured.
"${pip[@]}" --no-deps -r scripts/sglang-cpu-requirements.txt
"$venv/bin/python" scripts/sglang_torchvision_guard.py
# The import-only sgl_kernel stand-in is put on PYTHONPATH by the driver at launch; check
# that SGLang's server modules import with it, as the driver will run them.
PYTHONPATH=pytest_rkv/drivers/sglang/standin SGLANG_USE_CPU_ENGINE=1 "$venv/bin/python" -c \
  "import sglang, sglang.srt.managers.scheduler, sglang.srt.entrypoints.http_server, sglang.srt.models.llama; print('SGLang', sglang.__version__, 'imports cleanly')"
