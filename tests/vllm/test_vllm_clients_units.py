"""Pure parts of the adapter's client paths: the generated tokenizer, the stream's `rkv`
record, the 409 before a stream, message-claim bodies. (Live: test_vllm_adapter_clients.py.)"""

import asyncio
import json
from types import SimpleNamespace

import pytest

from pytest_rkv.adapters.vllm import chat, streaming
from pytest_rkv.contract import servable_blocks
from pytest_rkv.drivers.vllm import model


def run(coro):
    return asyncio.run(coro)


# -- the last-block rule ----------------------------------------------------------------------

@pytest.mark.parametrize(("n", "blocks"), [(1, 0), (31, 0), (32, 0), (33, 1), (320, 9), (321, 10), (352, 10)])
def test_servable_blocks_never_include_the_block_of_the_last_token(n, blocks):
    assert servable_blocks(n, 32) == blocks


# -- the generated tokenizer ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    directory = model.write_tiny_model(tmp_path_factory.mktemp("tiny"), 4096)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


def render(tokenizer, messages, add_generation_prompt):
    return list(tokenizer.apply_chat_template(messages, tokenize=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def test_tokenizer_matches_the_model_config(tokenizer, tmp_path):
    config = model.tiny_llama_config(4096)
    assert len(tokenizer) == config["vocab_size"]
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert tokenizer("Read the file, then answer.")["input_ids"] == [
        tokenizer.convert_tokens_to_ids(w) for w in ["read", "the", "file", ",", "then", "answer", "."]]


def test_a_rendered_conversation_is_a_prefix_of_every_later_turn(tokenizer):
    system = {"role": "system", "content": "You are an agent. Use the tool, then answer."}
    user = {"role": "user", "content": "Find the file and read it."}
    claimed = render(tokenizer, [system, user], False)
    asked = render(tokenizer, [system, user], True)
    later = render(tokenizer, [system, user, {"role": "assistant", "content": "Done."},
                               {"role": "user", "content": "Now write it back."}], True)
    assert asked[: len(claimed)] == claimed and later[: len(claimed)] == claimed
    assert later[: len(asked)] == asked, "the generation prompt starts the assistant's message"
    markers = [tokenizer.convert_tokens_to_ids(t) for t in ("<|system|>", "<|end|>", "<|user|>")]
    assert [claimed[0], claimed[-1]] == [markers[0], markers[1]] and markers[2] in claimed


# -- the rkv record in a stream ---------------------------------------------------------------

def sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class FakeTap:
    def __init__(self, outcome=None):
        self.outcome = outcome

    @property
    def refused(self):
        return (self.outcome or {}).get("refused")


async def agen(items):
    for item in items:
        yield item


async def collect(stream):
    return [e async for e in stream]


def test_the_record_goes_on_the_last_data_event_only():
    reuse = [{"claim_id": "claim-2", "tokens": 64, "restored": False, "recomputed_tokens": 0}]
    tap = FakeTap({"request_id": "r1", "reuse": reuse})
    chunks = [sse({"choices": [{"text": "a"}]}), sse({"choices": [{"text": "b", "finish_reason": "length"}]}),
              sse({"choices": [], "usage": {"prompt_tokens": 70}}), "data: [DONE]\n\n"]
    out = run(collect(streaming.events_with_record(chunks[0], agen(chunks[1:]), tap, "r1")))
    assert out[:2] == chunks[:2] and out[3] == "data: [DONE]\n\n"
    assert json.loads(out[2].removeprefix("data: ")) == {
        "choices": [], "usage": {"prompt_tokens": 70},
        "rkv": {"request_id": "r1", "reuse": reuse, "failures": []}}
    assert out[2].endswith("\n\n")


def test_a_stream_without_an_outcome_still_gets_an_empty_record():
    out = run(collect(streaming.events_with_record(None, agen([sse({"choices": []}), "data: [DONE]\n\n"]),
                                                   FakeTap(), "r9")))
    assert json.loads(out[0].removeprefix("data: "))["rkv"] == {"request_id": "r9", "reuse": [], "failures": []}


@pytest.mark.parametrize("event", ["data: [DONE]\n\n", "data: not json\n\n", ": keep-alive\n\n", "data: [1]\n\n"])
def test_events_that_are_not_json_objects_are_left_alone(event):
    assert streaming.with_record(event, {"request_id": "r"}) == event


def test_a_refusal_before_the_first_token_is_a_409_and_the_stream_is_closed():
    pytest.importorskip("fastapi")  # vLLM's API server framework
    from pytest_rkv.adapters.vllm.endpoints import _stream

    refusal = {"type": "active_refusal", "blocking_claims": ["claim-2"], "request_id": "r1"}
    tap = FakeTap()
    closed = []

    async def events():
        try:
            tap.outcome = {"request_id": "r1", "refused": refusal}  # vLLM's first output reached the tap
            yield sse({"choices": [{"text": "", "finish_reason": "abort"}]})
            yield "data: [DONE]\n\n"
        finally:
            closed.append(True)

    response = run(_stream(events(), tap, "r1"))
    assert response.status_code == 409 and json.loads(response.body) == {"error": refusal}
    assert closed == [True]


# -- claims from messages ---------------------------------------------------------------------

def test_claim_bodies_without_messages_pass_through_and_mixed_ones_are_422():
    body = {"prompt_token_ids": [1, 2, 3], "strength": "soft"}
    assert run(chat.claim_body(None, body)) == (body, None)
    _, error = run(chat.claim_body(None, {"prompt_token_ids": [1], "messages": []}))
    assert error["status"] == 422 and error["body"]["error"]["fields"][0]["loc"] == ["messages"]
    _, error = run(chat.claim_body(None, {"prompt_token_ids": [1], "add_generation_prompt": True}))
    assert error["status"] == 422 and "only allowed with messages" in error["body"]["error"]["message"]


def test_messages_need_a_chat_handler_with_a_tokenizer():
    messages = {"messages": [{"role": "user", "content": "hi"}]}
    _, error = run(chat.claim_body(None, messages))
    assert error["status"] == 501
    no_tokenizer = SimpleNamespace(renderer=SimpleNamespace(tokenizer=None))
    _, error = run(chat.claim_body(no_tokenizer, messages))
    assert error == {"status": 400, "body": {"error": {"type": "invalid_request", "message": chat.NO_TOKENIZER,
                                                       "reason": "no_tokenizer"}}}
