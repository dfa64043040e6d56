"""The dynamo driver's pure parts: deployment plan, worker ids, tokenizer, answer parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runtimes import require_driver_modules

require_driver_modules("dynamo")

from pytest_rkv.drivers.dynamo import deploy, model  # noqa: E402
from pytest_rkv.drivers.dynamo.driver import completion_from_dynamo, routed_from_nvext  # noqa: E402
from pytest_rkv.drivers.netns import LoopbackNamespace  # noqa: E402
from pytest_rkv.errors import HarnessError, ProtocolViolation  # noqa: E402


def _plan(tmp_path: Path, generation: int = 0) -> deploy.DeploymentPlan:
    return deploy.plan_deployment(python="/venv/bin/python", model_dir=tmp_path / "m", workdir=tmp_path,
                                  base_env={"PATH": "/bin", "DYN_LOG": "debug", "VIRTUAL_ENV": "/x"},
                                  generation=generation)


def test_plan_gives_every_worker_the_canonical_pool_and_its_own_event_ports(tmp_path):
    plan = _plan(tmp_path)
    assert len(plan.workers) == deploy.WORKERS == 2
    for wp in plan.workers:
        argv = wp.argv
        assert argv[:3] == ["/venv/bin/python", "-m", "dynamo.mocker"]
        assert argv[argv.index("--num-gpu-blocks-override") + 1] == "80"
        assert argv[argv.index("--block-size") + 1] == "16"
        assert argv[argv.index("--zmq-kv-events-ports") + 1] == str(wp.events_port)
        assert argv[argv.index("--zmq-replay-ports") + 1] == str(wp.replay_port)
        assert "--num-workers" not in argv  # one process per worker: ids and ports map 1:1
    ports = [p for wp in plan.workers for p in (wp.events_port, wp.replay_port)] + [plan.http_port]
    assert len(set(ports)) == len(ports)
    front = plan.frontend.argv
    assert front[front.index("--router-mode") + 1] == "kv"
    assert front[front.index("--http-host") + 1] == "127.0.0.1"
    assert front[front.index("--kv-cache-block-size") + 1] == "16"


def test_plan_environment_is_loopback_and_drops_foreign_dynamo_settings(tmp_path):
    env = _plan(tmp_path).env
    for key in ("DYN_TCP_RPC_HOST", "DYN_TCP_RESPONSE_STREAM_HOST", "DYN_EVENT_PLANE_HOST", "DYN_SYSTEM_HOST"):
        assert env[key] == "127.0.0.1"
    assert "DYN_LOG" not in env and "VIRTUAL_ENV" not in env
    assert env["DYN_FILE_KV"] == str(tmp_path / "discovery-0")
    assert env[deploy.MARKER_ENV] == str(tmp_path)


def test_each_generation_gets_fresh_ports_and_discovery(tmp_path):
    a, b = _plan(tmp_path, 0), _plan(tmp_path, 1)
    assert a.http_port != b.http_port and a.discovery_dir != b.discovery_dir
    assert {w.events_port for w in a.workers}.isdisjoint({w.events_port for w in b.workers})


def test_worker_id_is_read_through_colour_codes():
    line = "\x1b[2m2026\x1b[0m INFO WorkerKvQuery endpoint starting for worker \x1b[1m17540180117292583529\x1b[0m"
    assert deploy.worker_id_in(line) == "17540180117292583529"
    assert deploy.worker_id_in("INFO nothing here") is None


def test_tokenizer_covers_the_model_vocab_and_the_frontend_needs(tmp_path):
    directory = model.write_model(tmp_path)
    tok = json.loads((directory / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(model.VOCAB_SIZE))
    assert json.loads((directory / "config.json").read_text())["vocab_size"] == model.VOCAB_SIZE
    assert "chat_template" in json.loads((directory / "tokenizer_config.json").read_text())


def test_missing_venv_is_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv(deploy.VENV_ENV, str(tmp_path / "nowhere"))
    why = deploy.missing_venv()
    assert why and "setup_dynamo.sh" in why and "\n" not in why


def test_routed_from_nvext_names_the_workers():
    routed = routed_from_nvext({"worker_id": {"prefill_worker_id": 12, "decode_worker_id": 34},
                                "timing": {"kv_hit_rate": 0.5}})
    assert (routed.worker, routed.decode_worker, routed.kv_hit_rate) == ("12", "34", 0.5)
    assert routed_from_nvext(None).worker is None


def test_completion_without_cached_tokens_is_a_protocol_violation():
    payload = {"id": "c", "model": "m", "choices": [{"text": "", "index": 0, "finish_reason": "length"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
    with pytest.raises(ProtocolViolation, match="cached_tokens"):
        completion_from_dynamo(payload)
    payload["usage"]["prompt_tokens_details"] = {"cached_tokens": 2, "audio_tokens": None}
    assert completion_from_dynamo(payload).usage.prompt_tokens_details.cached_tokens == 2


def test_namespace_used_before_start_is_a_harness_error(tmp_path):
    ns = LoopbackNamespace(tmp_path)
    with pytest.raises(HarnessError, match="before start"):
        ns.wrap(["true"])
    ns.stop()  # safe before start


# -- dynamo+rkv: the indexer's answer and the merged event streams (pure parts) ----------

from pytest_rkv.contract import Event, EventType  # noqa: E402
from pytest_rkv.drivers.dynamo.indexer import indexer_argv, overlap_by_worker  # noqa: E402
from pytest_rkv.drivers.dynamo_rkv import MergedStream  # noqa: E402


def test_indexer_scores_become_cached_tokens_per_worker_name():
    answer = {"scores": {"1": {"0": 320}, "2": {"0": 160}}, "frequencies": [], "instances": {}}
    assert overlap_by_worker(answer, ["w0", "w1"]) == {"w0": 320, "w1": 160}
    assert overlap_by_worker({"scores": {}, "frequencies": []}, ["w0", "w1"]) == {}


@pytest.mark.parametrize("answer", [
    [], {"no": "scores"}, {"scores": {"3": {"0": 1}}}, {"scores": {"1": 5}}, {"scores": {"1": {"0": -1}}},
    {"scores": {"w0": {"0": 1}}},
])
def test_an_indexer_answer_outside_its_shape_is_a_protocol_violation(answer):
    with pytest.raises(ProtocolViolation):
        overlap_by_worker(answer, ["w0", "w1"])


def test_indexer_subscribes_to_every_worker_with_ids_from_one(tmp_path):
    argv = indexer_argv(tmp_path / "python", {"w0": "ipc:///a.sock", "w1": "ipc:///b.sock"}, 32)
    assert argv[argv.index("--workers") + 1] == "1=ipc:///a.sock,2=ipc:///b.sock"
    assert argv[argv.index("--block-size") + 1] == "32"


def _event(seq: int, ts: float, worker: str) -> Event:
    return Event(seq=seq, ts=ts, type=EventType.REQUEST_COMPLETED, request_id=f"r{seq}", worker=worker)


def test_merged_stream_numbers_on_interleaves_by_time_and_keeps_each_worker_s_order():
    feeds = {"w0": [_event(1, 1.0, "w0"), _event(2, 3.0, "w0")], "w1": [_event(1, 2.0, "w1"), _event(2, 0.5, "w1")]}
    stream = MergedStream(dict.fromkeys(feeds, 0))
    stream.pull(lambda w, after: [e for e in feeds[w] if e.seq > after])
    assert [(e.seq, e.worker, e.request_id) for e in stream.after(0)] == [
        (1, "w0", "r1"), (2, "w1", "r1"), (3, "w1", "r2"), (4, "w0", "r2")]  # w1's own order kept
    feeds["w0"].append(_event(3, 0.1, "w0"))  # late, with an early stamp: appended, never renumbered
    stream.pull(lambda w, after: [e for e in feeds[w] if e.seq > after])
    assert [e.seq for e in stream.after(4)] == [5] and stream.after(4, "w1") == []
    stream.clear()
    assert stream.after(0) == [] and stream.cursors == {"w0": 0, "w1": 0}
