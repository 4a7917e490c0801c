"""The Triton launch configuration: chosen once by timing, remembered in memory and on disk, never
timed during CUDA-graph capture; launches guarded onto the params' device. The timing itself needs
a GPU (tests/test_gpu.py runs the tuned kernels); here it is a fake, so the logic runs anywhere."""

import json

import pytest
import torch

K = pytest.importorskip("fsgld_fused.kernels.triton_ops")


@pytest.fixture
def tune(monkeypatch, tmp_path):
    monkeypatch.setenv("FSGLD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(K, "_tuned", {})
    calls = []

    def measure(block, warps):  # (1024, 8) is the fastest
        calls.append((block, warps))
        return abs(block - 1024) + 1.0

    return calls, measure


def test_timed_once_then_remembered(tune):
    calls, measure = tune
    key, disk_key = (0, torch.float32, 24), K._tune_disk_key("GPU X", torch.float32, 24)
    assert K._choose_config(key, disk_key, False, measure) == (1024, 8)
    assert sorted(calls) == sorted(K._CONFIGS)
    calls.clear()
    assert K._choose_config(key, disk_key, False, measure) == (1024, 8)
    assert calls == []


def test_saved_on_disk_by_device_name_and_triton_version(tune):
    calls, measure = tune
    key, disk_key = (0, torch.bfloat16, 20), K._tune_disk_key("GPU X", torch.bfloat16, 20)
    K._choose_config(key, disk_key, False, measure)
    saved = json.load(open(K._tune_cache_path()))
    assert saved == {disk_key: [1024, 8]}
    assert "GPU X" in disk_key and K.triton.__version__ in disk_key
    K._tuned.clear()  # a new process: only the file remembers
    calls.clear()
    assert K._choose_config(key, disk_key, False, measure) == (1024, 8)
    assert calls == []
    # another device name is tuned afresh
    other = K._tune_disk_key("GPU Y", torch.bfloat16, 20)
    assert K._choose_config((1, torch.bfloat16, 20), other, False, measure) == (1024, 8)
    assert len(calls) == len(K._CONFIGS)
    assert set(json.load(open(K._tune_cache_path()))) == {disk_key, other}


def test_never_timed_during_capture(tune):
    calls, measure = tune
    key, disk_key = (0, torch.float32, 22), K._tune_disk_key("GPU X", torch.float32, 22)
    assert K._choose_config(key, disk_key, True, measure) == K._DEFAULT_CONFIG
    assert calls == [] and K._tuned == {}
    assert K._read_tune_cache(K._tune_cache_path()) == {}
    # after a step outside capture has tuned, capture uses that choice
    K._choose_config(key, disk_key, False, measure)
    calls.clear()
    assert K._choose_config(key, disk_key, True, measure) == (1024, 8) and calls == []


def test_bad_or_unwritable_cache_is_not_fatal(tune, tmp_path, monkeypatch):
    calls, measure = tune
    path = K._tune_cache_path()
    (tmp_path / "cache").mkdir()
    disk_key = K._tune_disk_key("GPU X", torch.float32, 21)
    open(path, "w").write('{"%s": [3, 3]}' % disk_key)  # not one of _CONFIGS: ignored
    assert K._choose_config((0, torch.float32, 21), disk_key, False, measure) == (1024, 8)
    assert len(calls) == len(K._CONFIGS)
    open(path, "w").write("not json")
    K._tuned.clear()
    assert K._choose_config((0, torch.float32, 21), disk_key, False, measure) == (1024, 8)
    monkeypatch.setenv("FSGLD_CACHE_DIR", str(tmp_path / "file-not-dir" / "x"))
    (tmp_path / "file-not-dir").write_text("")
    K._tuned.clear()
    assert K._choose_config((0, torch.float32, 21), disk_key, False, measure) == (1024, 8)


def test_launches_are_guarded_onto_the_params_device():
    guard = K._on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with K._on_device(torch.device("cpu")):
        pass
    # the CPU interpreter and non-CUDA devices never tune
    assert K._tuned_block(torch.device("cpu"), torch.float32, 1 << 30) == (256, 4)
