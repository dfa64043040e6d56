"""The tiny model a Dynamo deployment serves: the vLLM driver's tiny Llama config, plus a
word-level tokenizer and a chat template.

The frontend refuses to register a model without a tokenizer and a chat template (it
builds its chat preprocessor at registration, even for completions); the mocker reads
only `config.json`. Prompts are token ids, so the tokenizer only has to cover the vocab
(ids 0..511: `<unk>`, `<s>`, `</s>`, then `t3`..`t511`) and is written by hand: no
download, no tokenizer library needed.
"""

from __future__ import annotations

import json
from pathlib import Path

from pytest_rkv.drivers.vllm.model import tiny_llama_config

SERVED_NAME = "rkv-tiny"
DIRNAME = "rkv-tiny-dynamo"
SPECIAL = ("<unk>", "<s>", "</s>")
VOCAB_SIZE = 512
MAX_POSITIONS = 4096


def tokenizer_json() -> dict:
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    vocab.update({f"t{i}": i for i in range(len(SPECIAL), VOCAB_SIZE)})
    added = [{"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, token in enumerate(SPECIAL)]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
            "decoder": None, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}}


def write_model(workdir: Path) -> Path:
    directory = workdir / DIRNAME
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(MAX_POSITIONS)
    assert config["vocab_size"] == VOCAB_SIZE, "the tokenizer must cover the model's vocab"
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json()) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": MAX_POSITIONS,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}",
    }, indent=2) + "\n")
    return directory
