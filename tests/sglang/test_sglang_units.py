"""The `sglang` driver's pure parts: command line, answer mapping, the last-page rule, the
pool check, and the CPU stand-ins (no SGLang server needed)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.runtimes import require_driver_modules

require_driver_modules("sglang")

from pytest_rkv.contract import CompletionRequest  # noqa: E402
from pytest_rkv.drivers.sglang import environment as env_mod  # noqa: E402
from pytest_rkv.drivers.sglang.driver import (  # noqa: E402
    check_cached_tokens,
    completion_from_sglang,
    error_from_sglang,
    generate_body,
    max_cached_tokens,
    verify_geometry,
)
from pytest_rkv.drivers.sglang.model import tokenizer_json  # noqa: E402
from pytest_rkv.drivers.sglang.server import KERNEL_CALL_LOG_ENV, MARKER_ENV, plan_server  # noqa: E402
from pytest_rkv.drivers.vllm.model import ModelChoice  # noqa: E402
from pytest_rkv.errors import GeometryMismatch, ProtocolViolation  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _env(real_kernel=None):
    return env_mod.SglangEnvironment(python="/venv/bin/python", sglang_version="0.5.23", torch_version="2.13.0+cpu",
                                     torchvision_version="0.28.0", real_sgl_kernel=real_kernel,
                                     torchvision_guarded=real_kernel is None)


def _plan(tmp_path, real_kernel=None, base_env=None):
    model = ModelChoice(str(tmp_path / "m"), "rkv-tiny-llama", generated=True, local=True)
    return plan_server(environment=_env(real_kernel), model=model, page_size=16, workdir=tmp_path,
                       port=1, events_port=2, replay_port=3, base_env=base_env or {"PYTHONPATH": "/x"})


def test_cpu_plan_runs_sglang_from_its_venv_with_the_stand_in_first_on_the_path(tmp_path):
    plan = _plan(tmp_path)
    assert plan.argv[:3] == ["/venv/bin/python", "-m", "sglang.launch_server"]
    args = " ".join(plan.argv)
    for flag in ("--page-size 16", "--max-total-tokens 1280", "--device cpu", "--attention-backend torch_native",
                 "--enable-streaming-session", "--radix-eviction-policy priority", "--load-format dummy"):
        assert flag in args
    assert '"bind":true' in args and '"endpoint":"tcp://127.0.0.1:2"' in args
    assert plan.env["PYTHONPATH"] == f"{env_mod.STAND_IN_DIR}{os.pathsep}/x"
    assert plan.env["SGLANG_USE_CPU_ENGINE"] == "1" and plan.env[MARKER_ENV] == str(tmp_path)
    assert plan.env[KERNEL_CALL_LOG_ENV] == str(tmp_path / "sgl-kernel-calls.log")


def test_gpu_plan_uses_the_real_kernels_and_no_stand_in(tmp_path):
    plan = _plan(tmp_path, real_kernel="0.3.0")
    assert "--device" not in plan.argv and "SGLANG_USE_CPU_ENGINE" not in plan.env
    assert plan.env["PYTHONPATH"] == "/x" and not plan.on_cpu
    assert _env("0.3.0").stand_ins() == []


def test_stand_ins_are_declared_for_the_row():
    replaced = [s.split(":")[0] for s in _env().stand_ins()]
    assert replaced == ["sgl_kernel", "torchvision 0.28.0"]


def test_last_page_is_never_served_from_cache():
    assert max_cached_tokens(960, 16) == 944  # a repeated 60-page prompt hits 59 pages
    assert max_cached_tokens(961, 16) == 960  # with one more token, all 60
    assert max_cached_tokens(1, 16) == 0


@pytest.mark.parametrize("prompt, cached, ok", [
    (960, 944, True), (961, 960, True), (960, 960, False), (961, 950, False), (961, 0, True)])
def test_cached_tokens_are_checked_exactly(prompt, cached, ok):
    completion = completion_from_sglang(
        {"text": "t5", "output_ids": [5], "meta_info": {"id": "r1", "prompt_tokens": prompt, "completion_tokens": 1,
                                                       "cached_tokens": cached, "finish_reason": {"type": "length"}}},
        "rkv-tiny-llama")
    if ok:
        check_cached_tokens(completion, 16)
    else:
        with pytest.raises(ProtocolViolation, match="at most"):
            check_cached_tokens(completion, 16)


def test_generate_answer_maps_to_a_completion():
    c = completion_from_sglang({"text": "t5 t6", "output_ids": [5, 6], "meta_info": {
        "id": "abc", "prompt_tokens": 961, "completion_tokens": 2, "cached_tokens": 960,
        "finish_reason": {"type": "length", "length": 2}}}, "m")
    assert (c.id, c.model, c.choices[0].token_ids, c.choices[0].finish_reason) == ("abc", "m", [5, 6], "length")
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (961, 2, 963)
    assert c.usage.prompt_tokens_details.cached_tokens == 960 and c.rkv is None
    with pytest.raises(ProtocolViolation, match="lacks"):
        completion_from_sglang({"text": ""}, "m")


def test_generate_body_flips_priority_and_names_the_session():
    body = generate_body(CompletionRequest(prompt=[1, 2], max_tokens=3), "rid-1", priority=-(-100), session_id="s")
    assert body == {"input_ids": [1, 2], "rid": "rid-1", "priority": 100, "session_params": {"id": "s"},
                    "sampling_params": {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True}}


def test_errors_map_to_contract_types():
    too_long = error_from_sglang(400, {"error": {"message": "The input (5000 tokens) is longer than the model's "
                                                            "context length (4096 tokens)."}}, "r")
    assert (too_long.type, too_long.request_id) == ("capacity", "r")
    assert error_from_sglang(400, {"object": "error", "message": "bad"}).type == "invalid_request"


def test_pool_is_verified_exactly():
    assert verify_geometry({"max_total_num_tokens": 1280, "page_size": 16}, 16) == {
        "max_total_num_tokens": 1280, "page_size": 16}
    assert verify_geometry({"internal_states": [{"max_total_num_tokens": 1280}], "page_size": 16}, 16)
    with pytest.raises(GeometryMismatch, match="max_total_num_tokens is 640"):
        verify_geometry({"max_total_num_tokens": 640, "page_size": 16}, 16)
    with pytest.raises(GeometryMismatch, match="no max_total_num_tokens"):
        verify_geometry({}, 16)


def test_tokenizer_has_one_word_per_id():
    vocab = tokenizer_json()["model"]["vocab"]
    assert sorted(vocab.values()) == list(range(1000))


def test_missing_interpreter_says_how_to_get_one(tmp_path):
    with pytest.raises(env_mod.SglangMissing, match="setup_sglang.sh"):
        env_mod.find_python({env_mod.PYTHON_ENV: str(tmp_path / "nope")})
    assert env_mod.find_python({env_mod.PYTHON_ENV: sys.executable}) == sys.executable
    with pytest.raises(env_mod.SglangMissing, match="has no sglang"):
        env_mod.inspect(sys.executable)


def test_kernel_stand_in_imports_anything_and_raises_on_any_call(tmp_path):
    calls = tmp_path / "calls.log"
    code = textwrap.dedent("""
        import sgl_kernel
        from sgl_kernel.cpu import fused_experts_cpu
        assert sgl_kernel.STAND_IN
        try:
            import sgl_kernel.scalar_type
        except ImportError:
            pass
        else:
            raise SystemExit("scalar_type must not import: SGLang falls back on ImportError")
        fused_experts_cpu(1, 2)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(env_mod.STAND_IN_DIR), KERNEL_CALL_LOG_ENV: str(calls)})
    assert out.returncode == 1
    assert "SglKernelStandInCalled" in out.stderr and "'sgl_kernel.cpu.fused_experts_cpu'" in out.stderr
    assert calls.read_text().split() == ["sgl_kernel.cpu.fused_experts_cpu"]


def test_torchvision_guard_is_applied_once(tmp_path):
    pkg = tmp_path / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    original = ("import torchvision.extension  # noqa: F401\n\n"
                '@torch.library.register_fake("torchvision::nms")\ndef f(): pass\n')
    (pkg / "_meta_registrations.py").write_text(original)
    script = [sys.executable, str(REPO / "scripts" / "sglang_torchvision_guard.py")]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    first = subprocess.run(script, capture_output=True, text=True, env=env)
    second = subprocess.run(script, capture_output=True, text=True, env=env)
    text = (pkg / "_meta_registrations.py").read_text()
    assert "guarded" in first.stdout and "already guarded" in second.stdout
    assert env_mod.TORCHVISION_GUARD_MARK in text and "@_rkv_register_fake(" in text
    assert "@torch.library.register_fake(" not in text
