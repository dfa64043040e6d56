"""GPU memory hygiene: the wait after a server stops (nvidia-smi faked; no GPU here)."""

from pytest_rkv.drivers import gpu


def test_no_gpu_means_nothing_to_wait_for(monkeypatch):
    monkeypatch.setattr(gpu.shutil, "which", lambda name: None)
    assert gpu.used_mib() is None
    assert gpu.wait_for_release(None) is None


def test_waits_until_memory_returns_to_baseline(monkeypatch):
    readings = iter([9000, 6000, 1200])
    monkeypatch.setattr(gpu, "used_mib", lambda: next(readings))
    monkeypatch.setattr(gpu.time, "sleep", lambda s: None)
    assert gpu.wait_for_release(1000, timeout=60) is None


def test_reports_memory_that_is_never_released(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(gpu, "used_mib", lambda: 20000)
    monkeypatch.setattr(gpu.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(gpu.time, "sleep", lambda s: None)
    problem = gpu.wait_for_release(1000, timeout=60)
    assert problem and "20000 MiB" in problem and "baseline 1000 MiB" in problem
