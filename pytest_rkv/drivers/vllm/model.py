"""The model the vLLM server loads.

Without `--rkv-model` the driver writes a tiny Llama `config.json` and starts vLLM with
`--load-format dummy --skip-tokenizer-init`: random weights, no tokenizer, no download.
The suite needs only the KV cache to behave, never sensible text, and the tiny model
makes prefill of a 2,560-token prompt take milliseconds on two CPU cores. Its shape is
chosen for the CPU attention backend: `head_dim` 32 (the smallest it accepts), one KV
head, vocab 512 (the workloads use token ids below 500).

With `--rkv-model` (a local directory or a hub id, e.g. on a GPU runner) the real
weights and tokenizer are used; prompts stay token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TINY_SERVED_NAME = "rkv-tiny-llama"
TINY_DIRNAME = "rkv-tiny-llama"


def tiny_llama_config(max_position_embeddings: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "vocab_size": 512,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
    }


def write_tiny_model(directory: Path, max_position_embeddings: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(
        json.dumps(tiny_llama_config(max_position_embeddings), indent=2) + "\n"
    )
    return directory


@dataclass(frozen=True)
class ModelChoice:
    source: str  # what vLLM's --model gets: a directory or a hub id
    served_name: str
    generated: bool  # the tiny dummy-weight model written by this driver
    local: bool  # no hub access needed (HF_HUB_OFFLINE=1 is safe)


def choose_model(requested: str | None, workdir: Path, max_model_len: int) -> ModelChoice:
    if not requested:
        path = write_tiny_model(workdir / TINY_DIRNAME, max(4096, max_model_len))
        return ModelChoice(str(path), TINY_SERVED_NAME, generated=True, local=True)
    local = Path(requested).expanduser()
    if local.exists():
        return ModelChoice(str(local.resolve()), requested, generated=False, local=True)
    return ModelChoice(requested, requested, generated=False, local=False)
