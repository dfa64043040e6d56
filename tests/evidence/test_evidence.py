"""The evidence formats and the transcript codec: round trips, and refusals of what replay
must never build (classes from outside pytest_rkv)."""

import json

import pytest

from pytest_rkv.contract import ClaimState, CompletionRequest
from pytest_rkv.drivers.base import Reply, Routed
from pytest_rkv.drivers.recording import Recorder, decode, decode_exception, encode, encode_exception
from pytest_rkv.errors import BackendCrashed, NoAnswer, Unsupported
from pytest_rkv.evidence import Call, EvidenceError, loads
from pytest_rkv.evidence import test_key as key_of


@pytest.mark.parametrize("value", [
    None, 3, "x", [1, "a"], {"k": [ClaimState.RESIDENT]},
    (Reply(status=409), Routed(worker="w1", kv_hit_rate=0.5)),
    CompletionRequest(prompt=[1, 2, 3], max_tokens=1),
])
def test_values_survive_the_transcript(value):
    encoded = json.loads(json.dumps(encode(value)))
    expected = list(value) if isinstance(value, tuple) else value
    assert decode(encoded) == expected


@pytest.mark.parametrize("exc", [Unsupported("no route", scope="probe"), NoAnswer(30.0, "queued"),
                                 BackendCrashed("died", log_tail="boom"), AssertionError("x != y")])
def test_exceptions_keep_their_class_and_attributes(exc):
    back = decode_exception(encode_exception(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and vars(back) == vars(exc)


def test_replay_builds_no_class_from_outside_pytest_rkv():
    with pytest.raises(EvidenceError, match="outside pytest_rkv"):
        decode({"$model": "os:system", "data": {}})
    with pytest.raises(EvidenceError, match="outside pytest_rkv"):
        decode({"$dataclass": "subprocess:Popen", "data": {}})
    assert type(decode_exception(encode_exception(OSError("x")))) is OSError
    foreign = encode_exception(ValueError("x")).model_copy(update={"type": "somewhere.else:Boom"})
    assert type(decode_exception(foreign)).__name__ == "HarnessError"


def test_the_recorder_notes_any_public_driver_method_in_order():
    class Fake:
        depth = "native"

        def route(self, req, worker=None):
            return Reply(status=200), Routed(worker=worker)

        def pool(self):
            raise Unsupported("no pool")

    recorder = Recorder(Fake(), "suites/test_x.py::test_y[fake]")
    recorder.route(CompletionRequest(prompt=[1]), worker="w2")
    with pytest.raises(Unsupported):
        recorder.pool()
    assert recorder.depth == "native"
    calls = [Call.model_validate(c) for c in recorder.calls]
    assert [(c.i, c.method) for c in calls] == [(0, "route"), (1, "pool")]
    assert calls[0].args["worker"] == "w2" and calls[1].raised.type == "pytest_rkv.errors:Unsupported"


def test_json_nesting_is_bounded_and_test_keys_ignore_the_backend():
    with pytest.raises(EvidenceError, match="nests deeper"):
        loads("[" * 1000 + "]" * 1000, "x.json")
    assert loads('{"a": "[[[[[["}', "x.json") == {"a": "[[[[[["}
    assert key_of("suites/test_x.py::test_y[vllm+rkv]") == key_of("other/test_x.py::test_y[replay]")
