"""GPU runtimes: onnxruntime's CUDA/TensorRT providers, native TensorRT engines, the GPU bench plumbing.

What runs everywhere: provider selection against the real onnxruntime installed here (the CPU build, so
asking for a GPU must fail clearly), the worker's timed_run path, the device report. What needs a GPU is
marked ``gpu`` and skipped without one.
"""

from __future__ import annotations

import importlib.util
import json
import multiprocessing as mp
import shutil
import sys
import threading

import numpy as np
import pytest
from helpers import assert_user_error, run_cli
from tiny_onnx import tiny_classifier

from edgekit.errors import EdgekitError


def cuda_available() -> bool:
    """An NVIDIA GPU with a driver (nvidia-smi), and a GPU build of onnxruntime or TensorRT to use it."""
    if shutil.which("nvidia-smi") is None:
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers() or importlib.util.find_spec("tensorrt") is not None


def _trt_ready() -> bool:
    return cuda_available() and importlib.util.find_spec("tensorrt") is not None and (
        importlib.util.find_spec("cuda") is not None)


@pytest.mark.parametrize("device, provider", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_missing_gpu_provider_is_a_clear_error(tmp_path, device, provider):
    import onnxruntime as ort

    from edgekit.runtimes.base import load

    if provider in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has {provider}")
    onnx = tiny_classifier(tmp_path / "tiny")
    with pytest.raises(EdgekitError) as err:
        load(onnx, device=device)
    text = str(err.value)
    assert provider in text and "pip install 'edgekit[gpu]'" in text and "onnxruntime-gpu" in text
    with pytest.raises(EdgekitError, match="use --device cpu, cuda or tensorrt"):
        load(onnx, device="npu")
    assert load(onnx).name == "onnxruntime"  # the CPU path is untouched


def test_provider_lists_and_fallback_detection(tmp_path):
    from edgekit.runtimes.ort_gpu import check_active, gpu_providers, tensorrt_provider_options

    have = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert gpu_providers("cuda", have) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    opts = tensorrt_provider_options(fp16=True, cache_dir=tmp_path)
    trt, *rest = gpu_providers("tensorrt", have, opts)
    assert trt == ("TensorrtExecutionProvider", opts) and rest == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert opts["trt_fp16_enable"] is True and opts["trt_engine_cache_enable"] is True
    assert opts["trt_engine_cache_path"] == str(tmp_path) == opts["trt_timing_cache_path"]
    assert "trt_int8_enable" not in opts  # Q/DQ models are built strongly typed without precision flags
    check_active("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(EdgekitError, match="fell back to CPUExecutionProvider"):
        check_active("cuda", ["CPUExecutionProvider"])


def test_bench_and_verify_on_cuda_without_a_gpu_build_exit_2(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDAExecutionProvider")
    onnx = tiny_classifier(tmp_path / "tiny")
    r = run_cli("bench", onnx, "--device", "cuda", "--iterations", "1", "--min-seconds", "0", expect=None)
    assert_user_error(r, "CUDAExecutionProvider", "pip install 'edgekit[gpu]'")
    r = run_cli("bench", onnx, "--runtime", "torch", "--device", "cuda", expect=None)
    assert_user_error(r, "torch runtime runs on the CPU only")


def test_verify_takes_the_candidate_runtime_and_device(tmp_path):
    from conftest import build_text_classifier, write_text_data

    ckpt = build_text_classifier(tmp_path / "ckpt", steps=2)
    data = write_text_data(tmp_path / "eval.tsv", 16, seed=1)
    onnx = tiny_classifier(tmp_path / "onnx")
    r = run_cli("verify", ckpt, onnx, "--data", data, "--runtime", "tensorrt", expect=None)
    assert_user_error(r, "runs on the GPU, not on 'cpu'", "--device cuda")
    r = run_cli("verify", ckpt, onnx, "--data", data, "--runtime", "tensorrt", "--device", "cuda", expect=None)
    assert_user_error(r, "holds no TensorRT engine", "edgekit engine build")


class _FakeGpuSession:
    """Stands in for a GPU session inside the real worker loop (same process, real pipe)."""

    name, device, input_names = "fake-gpu", "cuda", ["input_ids"]

    def timed_run(self, batch):
        return {"h2d_ms": 0.1, "compute_ms": 1.0, "d2h_ms": 0.05}

    def device_info(self):
        return {"timing": "cuda-events", "activation_bytes": 4096}


def test_worker_uses_timed_run_and_reports_the_device(monkeypatch):
    import edgekit.runtimes.base as base
    from edgekit.benchmarks import worker
    from edgekit.benchmarks.gpu import device_metrics

    monkeypatch.setattr(base, "load", lambda *a, **k: _FakeGpuSession())
    parent, child = mp.Pipe()
    t = threading.Thread(target=worker.serve, args=(child, "unused", None, 1, None, "cuda"), daemon=True)
    t.start()
    assert parent.recv()[0] == "ready"
    parent.send(("inputs", [{"input_ids": np.ones((1, 4), dtype=np.int64)}]))
    assert parent.recv() == ("ok",)
    parent.send(("run", 0, 5))
    tag, times, phases = parent.recv()
    assert tag == "times" and len(times) == len(phases) == 5 and phases[0]["compute_ms"] == 1.0
    parent.send(("stop",))
    tag, end = parent.recv()
    t.join(timeout=5)
    assert end["activation_bytes"] == 4096 and end["rss_peak"] > 0
    assert end["gpu_memory_bytes"] is None and end["gpu_memory_note"]  # no NVML here
    m = device_metrics(phases, end)
    assert m["phases"]["compute_ms"]["p50"] == 1.0 and m["runs_with_phases"] == 5 and m["timing"] == "cuda-events"


def test_gpu_environment_without_nvml():
    from edgekit.benchmarks.environment import environment
    from edgekit.benchmarks.gpu import add_device_environment

    env = add_device_environment(environment(1), "cuda")
    assert env["device"] == "cuda" and "tensorrt" in env["libraries"]
    if importlib.util.find_spec("pynvml") is None:
        assert env["gpu"] == {"available": False, "note": "nvidia-ml-py is not installed (pip install 'edgekit[gpu]')"}
    assert add_device_environment(environment(1), "cpu")["device"] == "cpu"


# ---- on a real GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs an NVIDIA GPU with onnxruntime-gpu or TensorRT")
def test_cuda_provider_session_matches_cpu(tmp_path):
    import onnxruntime as ort

    from edgekit.runtimes.base import load

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    onnx = tiny_classifier(tmp_path / "tiny")
    batch = {"input_ids": np.arange(24, dtype=np.int64).reshape(2, 12), "attention_mask": np.ones((2, 12), np.int64)}
    gpu, cpu = load(onnx, device="cuda"), load(onnx)
    assert gpu.name == "onnxruntime-cuda"
    np.testing.assert_allclose(gpu.run(batch), cpu.run(batch), rtol=1e-5)
    phases = gpu.timed_run(batch)
    assert phases["compute_ms"] > 0 and phases["h2d_ms"] >= 0
    r = run_cli("bench", onnx, "--device", "cuda", "--iterations", "20", "--min-seconds", "0", "--seq-len", "16", "--json")
    v = json.loads(r.stdout)["variants"][0]
    assert v["device"]["phases"]["compute_ms"]["p50"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not _trt_ready(), reason="needs an NVIDIA GPU, TensorRT and cuda-python")
def test_build_and_run_a_tensorrt_engine(tmp_path):
    from edgekit.runtimes.base import artifact_kind, load
    from edgekit.runtimes.tensorrt import build_engine, engine_report
    from edgekit.runtimes.tensorrt_plan import EngineOptions

    onnx = tiny_classifier(tmp_path / "tiny")
    path = build_engine(onnx, tmp_path / "engine", EngineOptions(batch=(1, 2, 4), seq=(1, 16, 32),
                                                                 timing_cache=str(tmp_path / "timing.cache")))
    assert artifact_kind(path.parent) == "engine" and (tmp_path / "timing.cache").is_file()
    report = engine_report(path)
    assert report.built_with["compute_capability"] and report.plan["profiles"]["input_ids"][2] == [4, 32]
    session = load(path.parent, device="cuda")
    batch = {"input_ids": np.arange(24, dtype=np.int64).reshape(2, 12), "attention_mask": np.ones((2, 12), np.int64)}
    np.testing.assert_allclose(session.run(batch), load(onnx).run(batch), rtol=1e-4, atol=1e-4)
    phases = session.timed_run(batch)
    assert set(phases) == {"h2d_ms", "compute_ms", "d2h_ms"} and phases["compute_ms"] > 0
    assert session.device_info()["activation_bytes"] is not None
    with pytest.raises(EdgekitError, match="outside the engine's profile"):
        session.run({k: np.ones((8, 12), np.int64) for k in batch})
    session.close()
    sidecar = json.loads((path.parent / "model.engine.json").read_text())
    sidecar["built_with"]["tensorrt"] = "9.0.0"
    (path.parent / "model.engine.json").write_text(json.dumps(sidecar))
    with pytest.raises(EdgekitError, match="rebuild it on this machine"):
        load(path.parent, device="cuda")
    assert sys.modules.get("tensorrt") is not None
