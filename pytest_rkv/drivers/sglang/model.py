"""The model the SGLang server loads.

Without `--rkv-model` the driver writes the tiny Llama of `drivers/vllm/model.py` with the
shape measured to work on SGLang's CPU `torch_native` attention (two KV heads, vocab
1,000, bfloat16) and a WordLevel tokenizer over its 1,000 ids, and starts SGLang with
`--load-format dummy`. The tokenizer is loaded (not `--skip-tokenizer-init`) so that
SGLang's OpenAI routes work too; the driver itself sends token ids to `/generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pytest_rkv.drivers.vllm.model import ModelChoice, tiny_llama_config

TINY_SERVED_NAME = "rkv-tiny-llama"
TINY_DIRNAME = "rkv-tiny-llama-sglang"
VOCAB_SIZE = 1000
SPECIAL = {"[UNK]": 0, "<s>": 1, "</s>": 2}


def tiny_config(max_position_embeddings: int) -> dict:
    config = tiny_llama_config(max_position_embeddings)
    config.update(num_key_value_heads=2, vocab_size=VOCAB_SIZE, torch_dtype="bfloat16")
    return config


def tokenizer_json() -> dict:
    """A `tokenizers` WordLevel tokenizer: the special tokens, then id i <-> word "t<i>",
    split on whitespace. Every id has exactly one word (transformers rebuilds the
    tokenizer from the vocabulary and breaks on duplicates)."""
    vocab = dict(SPECIAL)
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), VOCAB_SIZE)})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": tok, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for tok, i in SPECIAL.items()
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    }


def write_tiny_model(directory: Path, max_position_embeddings: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(tiny_config(max_position_embeddings), indent=2) + "\n")
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json()) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "[UNK]", "bos_token": "<s>", "eos_token": "</s>",
        "model_max_length": max_position_embeddings,
    }, indent=2) + "\n")
    return directory


def choose_model(requested: str | None, workdir: Path, max_position_embeddings: int) -> ModelChoice:
    if not requested:
        path = write_tiny_model(workdir / TINY_DIRNAME, max_position_embeddings)
        return ModelChoice(str(path), TINY_SERVED_NAME, generated=True, local=True)
    local = Path(requested).expanduser()
    if local.exists():
        return ModelChoice(str(local.resolve()), requested, generated=False, local=True)
    return ModelChoice(requested, requested, generated=False, local=False)
