"""Claims from real clients: the official `openai` client against a live `vllm+rkv` server.

One server for the module (a start costs 30-90 s on two loaded cores); every test starts
from an empty pool (`reset`). What each test checks is exact: the claim's blocks, the
`cached_tokens` vLLM reports, the `rkv` record of every answer (streamed or not), the
refusal body, and the event trace against the contract's state machine.
"""

import re
from pathlib import Path

import pytest

from pytest_rkv.contract import EventType
from pytest_rkv.drivers.base import DriverSettings
from pytest_rkv.trace import order_problems
from pytest_rkv.workload import prompt_tokens

from tests.runtimes import require_backend

pytestmark = require_backend("vllm+rkv")
openai = pytest.importorskip("openai")  # a dependency of vLLM's OpenAI server

DOC = Path(__file__).resolve().parents[2] / "docs" / "vllm-adapter.md"
B = 32  # the CPU build's block size (drivers/vllm/build.py)
# 15 tokens a sentence (the tiny model's tokenizer: one token per word or punctuation run).
SENTENCE = "You are a careful agent: read the task, plan, then act. "


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from pytest_rkv.drivers.vllm_rkv import VllmRkvDriver

    driver = VllmRkvDriver(DriverSettings(workdir=tmp_path_factory.mktemp("clients"), startup_timeout=900))
    driver.start()
    try:
        yield driver
    finally:
        driver.stop()


@pytest.fixture
def client(server):
    server.reset()
    # tenant A's token: the driver starts the server with two tenants (RKV_TOKENS)
    return openai.OpenAI(base_url=f"{server.plan.base_url}/v1", api_key=server.tokens[0], max_retries=0)


@pytest.fixture
def model(server):
    return server.model.served_name


@pytest.fixture(scope="module")
def rendered(server):
    """Token ids of messages as the generated model's chat template renders them, computed
    here with `transformers` from the files the server loaded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server.model.source)

    def render(messages: list[dict], add_generation_prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, tokenize=True,
                                                  add_generation_prompt=add_generation_prompt)["input_ids"])

    return render


def claim(client, **body) -> dict:
    return client.post("/kv/claims", cast_to=object, body=body)


def events(client) -> list[dict]:
    return client.get("/kv/events", cast_to=object)["events"]


def record(rid: str, claim_id: str | None = None, tokens: int = 0, recomputed: int = 0) -> dict:
    reuse = [{"claim_id": claim_id, "tokens": tokens, "restored": False,
              "recomputed_tokens": recomputed}] if claim_id else []
    return {"request_id": rid, "reuse": reuse, "failures": []}


def system(sentences: int) -> dict:
    return {"role": "system", "content": SENTENCE * sentences}


def trace_of(client) -> list[tuple]:
    """(type, claim_id, request_id) of every event, after checking the whole trace against
    the contract's state machine."""
    from pytest_rkv.contract import Event

    evs = [Event.model_validate(e) for e in events(client)]
    problems = order_problems(evs)
    assert not problems, "\n".join(problems)
    return [(e.type.value, e.claim_id, e.request_id) for e in evs]


def test_text_completion_references_a_claim(client, model):
    tokens = prompt_tokens("clients-text", 10, B)
    made = claim(client, prompt_token_ids=tokens)
    assert (made["state"], made["blocks"], made["tokens"]) == ("resident", 10, 10 * B)

    done = client.completions.create(model=model, prompt=tokens + [7], max_tokens=2,
                                     extra_body={"claim_id": made["claim_id"], "request_id": "text-1"})
    assert done.usage.prompt_tokens_details.cached_tokens == 10 * B
    assert done.rkv == record("text-1", made["claim_id"], 10 * B)

    streamed = list(client.completions.create(
        model=model, prompt=tokens + [7], max_tokens=2, stream=True,
        extra_body={"claim_id": made["claim_id"], "request_id": "text-2"}))
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "length"
    assert [getattr(c, "rkv", None) for c in streamed] == [None] * (len(streamed) - 1) + [
        record("text-2", made["claim_id"], 10 * B)], "the record belongs on the last chunk only"

    # The last-block rule: a prompt of exactly the claimed 10 blocks is served 9 of them.
    whole = client.completions.create(model=model, prompt=tokens, max_tokens=1,
                                      extra_body={"claim_id": made["claim_id"], "request_id": "text-3"})
    assert whole.usage.prompt_tokens_details.cached_tokens == 9 * B
    assert whole.rkv == record("text-3", made["claim_id"], 9 * B, recomputed=B)

    assert trace_of(client) == [
        ("claim.accepted", made["claim_id"], "claimreq-1"),
        ("claim.materialized", made["claim_id"], "claimreq-1"),
        ("claim.reused", made["claim_id"], "text-1"),
        ("request.completed", None, "text-1"),
        ("claim.reused", made["claim_id"], "text-2"),
        ("request.completed", None, "text-2"),
        ("claim.reused", made["claim_id"], "text-3"),
        ("request.completed", None, "text-3"),
    ]


def test_chat_claim_covers_what_later_turns_start_with(client, model, rendered):
    first = [system(8)]
    assert len(rendered(first, False)) == 8 * 15 + 2  # 3 full blocks
    made = claim(client, messages=first, strength="hard")
    assert (made["state"], made["blocks"], made["tokens"]) == ("resident", 3, 3 * B)

    turn = [*first, {"role": "user", "content": "Find the file and read it."}]
    prompt = rendered(turn, True)
    assert prompt[:122] == rendered(first, False) and len(prompt) == 122 + 10  # 4 full blocks
    reply = client.chat.completions.create(model=model, messages=turn, max_tokens=4,
                                           extra_body={"claim_id": made["claim_id"], "request_id": "chat-1"})
    assert reply.usage.prompt_tokens == len(prompt) and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens_details.cached_tokens == 3 * B
    assert reply.rkv == record("chat-1", made["claim_id"], 3 * B)

    chunks = list(client.chat.completions.create(
        model=model, messages=turn, max_tokens=4, stream=True, stream_options={"include_usage": True},
        extra_body={"claim_id": made["claim_id"], "request_id": "chat-2"}))
    last = chunks[-1]
    assert last.choices == [] and last.usage.prompt_tokens == len(prompt), "the last chunk is the usage chunk"
    assert last.usage.prompt_tokens_details.cached_tokens == 4 * B  # chat-1 left its 4th block cached
    assert last.rkv == record("chat-2", made["claim_id"], 3 * B)
    assert all(getattr(c, "rkv", None) is None for c in chunks[:-1])

    assert [t for t in trace_of(client) if t[0] != "request.completed"] == [
        ("claim.accepted", made["claim_id"], "claimreq-1"),
        ("claim.materialized", made["claim_id"], "claimreq-1"),
        ("claim.reused", made["claim_id"], "chat-1"),
        ("claim.reused", made["claim_id"], "chat-2"),
    ]


def test_a_claim_from_messages_is_the_claim_of_the_chat_prompt(client, model, rendered):
    """A claim made from messages names the same blocks as one made from the token ids vLLM
    reports for the same chat prompt, and as the model's own chat template renders it."""
    first = [system(8)]
    by_messages = claim(client, messages=first)
    reply = client.chat.completions.create(model=model, messages=first, max_tokens=1,
                                           extra_body={"return_token_ids": True,
                                                       "add_generation_prompt": False})
    assert reply.prompt_token_ids == rendered(first, False)
    by_ids = claim(client, prompt_token_ids=reply.prompt_token_ids)
    assert (by_ids["prefix_hash"], by_ids["blocks"]) == (by_messages["prefix_hash"], 3)


def test_a_refused_request_is_a_409_the_client_raises(client, model):
    held = claim(client, prompt_token_ids=prompt_tokens("clients-held", 60, B))
    active = prompt_tokens("clients-active", 70, B)
    expected = {
        "type": "active_refusal", "blocking_claims": [held["claim_id"]], "needed_blocks": 70,
        "free_blocks": 20, "evictable_blocks": 0, "claimed_blocks": {held["claim_id"]: 60},
    }
    for stream in (False, True):
        rid = f"refused-{int(stream)}"
        with pytest.raises(openai.ConflictError) as caught:
            out = client.completions.create(model=model, prompt=active, max_tokens=1, stream=stream,
                                            extra_body={"request_id": rid})
            list(out) if stream else out
        body = caught.value.response.json()["error"]
        assert {k: body[k] for k in expected} == expected and body["request_id"] == rid
        assert re.match(rf"request {rid} needs 70 blocks; 20 free \+ 0 evictable", body["message"])

    long_chat = [{"role": "user", "content": "the " * (70 * B)}]  # 2,242 tokens: 70 full blocks
    with pytest.raises(openai.ConflictError) as caught:
        list(client.chat.completions.create(model=model, messages=long_chat, max_tokens=1, stream=True,
                                            extra_body={"request_id": "refused-chat"}))
    assert caught.value.response.json()["error"]["blocking_claims"] == [held["claim_id"]]

    refused = [t for t in trace_of(client) if t[0] == EventType.REQUEST_REFUSED.value]
    assert refused == [("request.refused", None, rid) for rid in ("refused-0", "refused-1", "refused-chat")]
    again = client.completions.create(model=model, prompt=prompt_tokens("clients-held", 60, B) + [7],
                                      max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens == 60 * B, "the refusals cost the claim nothing"


def test_unknown_claim_and_bad_claim_bodies_are_client_errors(client, model):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=[system(1)], max_tokens=1,
                                       extra_body={"claim_id": "claim-404"})
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        claim(client, messages=[system(8)], prompt_token_ids=[1, 2, 3])
    assert caught.value.response.json()["error"]["message"] == "give either messages or prompt_token_ids, not both"
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        claim(client, messages=[{"content": "a message with no role"}])
    assert caught.value.response.json()["error"]["fields"][0]["loc"][0] == "messages"
    with pytest.raises(openai.UnprocessableEntityError):
        claim(client, messages=[system(1)])  # 17 tokens: not one full block
    assert events(client) == [], "a claim body in error must leave no trace"


def documented_outputs(code: str) -> list[str]:
    """What the doc says each `print(...)` shows: its trailing `# ...` comment, or the
    comment line right after it."""
    lines = code.splitlines()
    shown = []
    for i, line in enumerate(lines):
        if line.startswith("print("):
            _, sep, inline = line.partition(")  # ")
            shown.append(inline if sep else lines[i + 1].removeprefix("# "))
    return shown


def test_the_documented_client_calls_run_as_shown(server, client, model, capsys):
    block = re.search(r"```python\n(from openai import OpenAI\n.*?)```", DOC.read_text(), re.DOTALL)
    assert block, "docs/vllm-adapter.md lost its OpenAI client example"
    code = block.group(1)
    exec(compile(code, str(DOC), "exec"), {"BASE_URL": server.plan.base_url, "MODEL": model,
                                           "API_KEY": server.tokens[0]})
    printed = capsys.readouterr().out.splitlines()
    assert printed == documented_outputs(code) and len(printed) == 3
