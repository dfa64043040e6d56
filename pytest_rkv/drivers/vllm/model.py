"""The model the vLLM server loads.

Without `--rkv-model` the driver writes a tiny Llama `config.json` and a word-level
tokenizer with a chat template, and starts vLLM with `--load-format dummy`: random
weights, no download. The suite needs only the KV cache to behave, never sensible text,
and the tiny model makes prefill of a 2,560-token prompt take milliseconds on two CPU
cores. Its shape is chosen for the CPU attention backend: `head_dim` 32 (the smallest it
accepts), one KV head, vocab 512 (the workloads use token ids below 500).

The tokenizer is there for clients, not for the suite: the suite's probes send token ids,
which the tokenizer never touches (ids and block hashes are the same with or without it),
while chat messages and text prompts need one (`/v1/chat/completions` renders messages
with the chat template). It is word-level (`tokenizers`' `WordLevel` over whitespace and
punctuation): one token per word or punctuation run, so a rendered conversation's tokens
are a prefix of every later turn's tokens, and a claim made from messages covers exactly
what the next request starts with. Words outside its vocabulary become `<unk>`.

With `--rkv-model` (a local directory or a hub id, e.g. on a GPU runner) the real
weights and tokenizer are used; the suite's prompts stay token ids.
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


# Ids 0-2 are the specials the config names (unk, bos = 1, eos = 2); the role markers
# follow, so a rendered chat always tokenizes them as single tokens.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>")
# Every message is "<|role|> content <|end|>"; the generation prompt is the assistant
# marker, which is also how an assistant message starts, so any conversation renders as
# a prefix of its continuation.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
_WORDS = """
a about after again agent all also an and answer any are as ask at back be because been
before being below between both but by call can claim code could data day did do does done
down each end even every few file find first for from function get give go good had has have
he help her here him his how i if in into is it its just keep know last let like list look
make many may me more most my need new next no not now number of off old on once one only
or other our out over own part plan please prompt read result run said same say see she
should show so some start state step still such system take task tell than that the their
them then there these they thing think this those through time to tool too turn two under
until up us use used user very want was way we well were what when where which while who
why will with word work would write yes yet you your
""".split() + [str(n) for n in range(10)] + list(".,:;!?'\"()[]{}-_/=+*#")
TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "model_max_length": 1 << 20,
    "chat_template": CHAT_TEMPLATE,
}


def tiny_vocab(size: int) -> dict[str, int]:
    """Specials, then words and digits, then filler words `w<i>` up to the model's vocab."""
    words = [*SPECIAL_TOKENS, *_WORDS]
    words += [f"w{i}" for i in range(size - len(words))]
    return {w: i for i, w in enumerate(words)}


def tiny_tokenizer_json(vocab_size: int) -> str:
    """The `tokenizer.json` of the word-level tokenizer (built offline with `tokenizers`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordLevel(tiny_vocab(vocab_size), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok.to_str()


def write_tiny_model(directory: Path, max_position_embeddings: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_llama_config(max_position_embeddings)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "tokenizer.json").write_text(tiny_tokenizer_json(config["vocab_size"]))
    (directory / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
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
