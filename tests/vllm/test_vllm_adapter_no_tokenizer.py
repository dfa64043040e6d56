"""A `vllm+rkv` server without a tokenizer (`--skip-tokenizer-init`): chat is a clear 4xx.

vLLM's own chat route fails such a request with an assertion (HTTP 500); the adapter's
answers 400 and says why, and what works without a tokenizer keeps working: token-id
claims and completions. Its own module, so its server never runs beside the one of
test_vllm_adapter_clients.py.
"""

import pytest

from pytest_rkv.adapters.vllm.chat import NO_TOKENIZER
from pytest_rkv.drivers.base import DriverSettings
from pytest_rkv.workload import prompt_tokens

from tests.runtimes import require_backend

pytestmark = require_backend("vllm+rkv")
openai = pytest.importorskip("openai")  # a dependency of vLLM's OpenAI server

B = 32


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from pytest_rkv.drivers.vllm_rkv import VllmRkvDriver

    driver = VllmRkvDriver(DriverSettings(workdir=tmp_path_factory.mktemp("no-tokenizer"), startup_timeout=900),
                           extra_server_args=("--skip-tokenizer-init",))
    driver.start()
    try:
        yield openai.OpenAI(base_url=f"{driver.plan.base_url}/v1", api_key=driver.tokens[0], max_retries=0)
    finally:
        driver.stop()


def test_chat_without_a_tokenizer_is_a_400_that_says_why(client):
    messages = [{"role": "user", "content": "read the file"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="rkv-tiny-llama", messages=messages, max_tokens=1,
                                           stream=stream)
        error = caught.value.response.json()["error"]
        assert error == {"type": "invalid_request", "message": NO_TOKENIZER, "reason": "no_tokenizer"}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/kv/claims", cast_to=object, body={"messages": messages})
    assert caught.value.response.json()["error"]["message"] == NO_TOKENIZER


def test_token_ids_still_work_without_a_tokenizer(client):
    tokens = prompt_tokens("no-tokenizer", 4, B)
    made = client.post("/kv/claims", cast_to=object, body={"prompt_token_ids": tokens})
    assert (made["state"], made["tokens"]) == ("resident", 4 * B)
    done = client.completions.create(model="rkv-tiny-llama", prompt=tokens + [7], max_tokens=2,
                                     extra_body={"claim_id": made["claim_id"], "request_id": "ids-1",
                                                 "return_token_ids": True})
    assert done.usage.prompt_tokens_details.cached_tokens == 4 * B
    assert done.rkv == {"request_id": "ids-1", "failures": [],
                        "reuse": [{"claim_id": made["claim_id"], "tokens": 4 * B, "restored": False,
                                  "recomputed_tokens": 0}]}
    assert done.choices[0].text == "" and len(done.choices[0].token_ids) == 2
