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
    assert provider in text and "pip install 'edgekit-transformers[gpu]'" in text and "onnxruntime-gpu" in text
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
    assert "trt_int8_enable" not in opts  # a float model: no INT8 builder flag
    check_active("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(EdgekitError, match="fell back to CPUExecutionProvider"):
        check_active("cuda", ["CPUExecutionProvider"])


def test_bench_and_verify_on_cuda_without_a_gpu_build_exit_2(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDAExecutionProvider")
    onnx = tiny_classifier(tmp_path / "tiny")
    r = run_cli("bench", onnx, "--device", "cuda", "--iterations", "1", "--min-seconds", "0", expect=None)
    assert_user_error(r, "CUDAExecutionProvider", "pip install 'edgekit-transformers[gpu]'")
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


def _phased_worker(conn, onnx_path: str) -> None:
    """Spawned child: the real worker loop on a real onnxruntime session (the CPU build here), timed in
    phases through OrtGpuSession's IOBinding path with the buffers in CPU memory instead of CUDA memory."""
    import edgekit.runtimes.base as base
    from edgekit.benchmarks import worker
    from edgekit.runtimes.ort_gpu import OrtGpuSession

    cpu = base.load(onnx_path, device="cpu", threads=1)
    session = OrtGpuSession("onnxruntime-iobinding", cpu.path, cpu.task, cpu.input_names, cpu.output_name,
                            "cpu-iobinding", 1, {**cpu.info, "memory_device": "cpu"})
    base.load = lambda *a, **k: session  # this process only: the worker loads "its" model
    worker.serve(conn, onnx_path, None, 1, None, "cpu-iobinding")


def test_worker_uses_timed_run_and_reports_the_device(tmp_path):
    from edgekit.benchmarks.gpu import device_metrics

    onnx = tiny_classifier(tmp_path / "tiny")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_phased_worker, args=(child, str(onnx)), daemon=True)
    proc.start()
    try:
        assert parent.poll(60) and parent.recv()[0] == "ready"
        batches = [{"input_ids": np.full((1, n), 3, dtype=np.int64), "attention_mask": np.ones((1, n), np.int64),
                    "token_type_ids": np.zeros((1, n), np.int64)} for n in (4, 12)]
        parent.send(("inputs", batches))
        assert parent.recv() == ("ok",)
        parent.send(("warm", [0, 1]))
        assert parent.recv()[0] == "times"
        parent.send(("run", 0, 6))
        tag, times, phases = parent.recv()
        parent.send(("stop",))
        tag_end, end = parent.recv()
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    assert tag == "times" and tag_end == "stopped" and len(times) == len(phases) == 6
    for ns, ph in zip(times, phases):  # the worker's clock wraps the three phases it was handed back
        assert set(ph) == {"h2d_ms", "compute_ms", "d2h_ms"} and all(v > 0 for v in ph.values())
        assert sum(ph.values()) <= ns / 1e6
    assert end["cold_runs"] == 0 and end["rss_peak"] > 0
    assert end["providers"] == ["CPUExecutionProvider"]  # the real session's own answer
    assert end["gpu_memory_bytes"] is None and end["gpu_memory_note"]  # no NVML here
    m = device_metrics(phases, end)
    compute = sorted(p["compute_ms"] for p in phases)
    assert m["phases"]["compute_ms"]["p50"] == pytest.approx((compute[2] + compute[3]) / 2)
    assert m["runs_with_phases"] == 6 and m["timing"].startswith("host timers")


def test_gpu_environment_without_nvml():
    from edgekit.benchmarks.environment import environment
    from edgekit.benchmarks.gpu import add_device_environment

    env = add_device_environment(environment(1), "cuda")
    assert env["device"] == "cuda" and "tensorrt" in env["libraries"]
    if importlib.util.find_spec("pynvml") is None:
        assert env["gpu"] == {"available": False, "note": "nvidia-ml-py is not installed (pip install 'edgekit-transformers[gpu]')"}
    assert add_device_environment(environment(1), "cpu")["device"] == "cpu"


# ---- onnxruntime's TensorRT provider: its options, with onnxruntime faked where it needs a GPU ----------

# Keys of TensorrtExecutionProvider's provider options (onnxruntime's TensorRT execution provider documentation,
# "Execution Provider Options"); onnxruntime rejects an unknown key at session creation.
TRT_OPTION_KEYS = {
    "device_id", "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable", "trt_int8_calibration_table_name",
    "trt_int8_use_native_calibration_table", "trt_engine_cache_enable", "trt_engine_cache_path",
    "trt_timing_cache_enable", "trt_timing_cache_path", "trt_profile_min_shapes", "trt_profile_opt_shapes",
    "trt_profile_max_shapes", "trt_builder_optimization_level", "trt_dla_enable", "trt_layer_norm_fp32_fallback",
}


def parse_trt_profile(text: str) -> dict:
    """Parse trt_profile_*_shapes as onnxruntime's TensorRT provider does (its documentation: comma-separated
    "input_name:dim0xdim1x..." entries, each dim a positive integer); a malformed entry raises, as onnxruntime
    fails session creation on it."""
    out = {}
    for entry in text.split(","):
        name, _, dims = entry.rpartition(":")
        assert name and dims, f"malformed profile entry {entry!r}"
        shape = tuple(int(d) for d in dims.split("x"))
        assert all(d > 0 for d in shape), entry
        out[name] = shape
    return out


def assert_profile_covers(opts: dict, batches: list[dict]) -> None:
    """Every batch lies within [min, max] of each input, and opt within both: otherwise onnxruntime's TensorRT
    provider builds a new engine on the first batch outside the profile (its documentation, explicit shapes)."""
    lo, opt, hi = (parse_trt_profile(opts[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
    assert set(lo) == set(opt) == set(hi)
    for name in lo:
        assert all(a <= b <= c for a, b, c in zip(lo[name], opt[name], hi[name]))
        for b in batches:
            if name in b:
                assert all(a <= d <= c for a, d, c in zip(lo[name], b[name].shape, hi[name])), (name, b[name].shape)


def _batches(lengths, batch_size):
    """Batches as bench --data builds them: padded to each batch's longest, the last one short."""
    rows = [np.ones(n, np.int64) for n in lengths]
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        width = max(len(r) for r in chunk)
        ids = np.zeros((len(chunk), width), np.int64)
        out.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return out


def test_tensorrt_profile_covers_every_bench_and_verify_shape(tmp_path):
    import pickle

    from edgekit.runtimes.ort_gpu import TensorrtDevice, model_tensorrt_options, tensorrt_device_for

    onnx = tiny_classifier(tmp_path / "tiny")
    batches = _batches([12, 40, 7, 7, 9, 64, 3, 21, 33], batch_size=4)  # shapes 4x40, 4x64, 1x33
    device = tensorrt_device_for(batches)
    assert device == "tensorrt" and device.batch == (1, 4, 4) and device.seq[0] == 33 and device.seq[2] == 64
    assert pickle.loads(pickle.dumps(device)).settings() == device.settings()  # through the spawn pipe intact
    opts = model_tensorrt_options(onnx, device)
    assert set(opts) <= TRT_OPTION_KEYS
    assert_profile_covers(opts, batches)
    assert opts["trt_engine_cache_enable"] is True and opts["trt_engine_cache_path"]
    # a plain load (verify): its default batch 32 and max_length 128, from one example of one token up
    verify = [{"input_ids": np.ones((b, s), np.int64)} for b in (1, 32) for s in (1, 128)]
    assert_profile_covers(model_tensorrt_options(onnx, TensorrtDevice()), verify)
    assert_profile_covers(model_tensorrt_options(onnx, "tensorrt"), verify)
    fixed = model_tensorrt_options(tiny_classifier(tmp_path / "static", static_batch=2), device)
    assert parse_trt_profile(fixed["trt_profile_max_shapes"])["input_ids"] == (2, 64)  # a fixed dim stays


def test_qdq_models_enable_int8_without_a_calibration_table(tmp_path):
    from edgekit.runtimes.ort_gpu import TensorrtDevice, model_tensorrt_options

    qdq = model_tensorrt_options(tiny_classifier(tmp_path / "qdq", qdq=True), TensorrtDevice())
    assert qdq["trt_int8_enable"] is True and qdq["trt_int8_use_native_calibration_table"] is False
    assert "trt_int8_calibration_table_name" not in qdq  # explicit quantization: the scales are in the graph
    assert set(qdq) <= TRT_OPTION_KEYS
    assert "trt_int8_enable" not in model_tensorrt_options(tiny_classifier(tmp_path / "f32"), TensorrtDevice())


class _TrtDroppedSession:
    """onnxruntime.InferenceSession as onnxruntime-gpu behaves when TensorRT's libnvinfer.so.10 does not load
    (onnxruntime#18597; onnxruntime's TensorRT execution provider documentation, requirements): creation
    succeeds, the TensorRT provider is dropped with a logged error, and get_providers() lists CUDA and CPU.
    Provider options are checked against the documented keys, as onnxruntime refuses unknown ones; the model
    itself runs on the real CPU onnxruntime."""

    seen: list = []
    real = None  # the real onnxruntime.InferenceSession, set by _fake_trt_onnxruntime

    def __init__(self, path, sess_options=None, providers=None):
        trt = dict([p for p in providers if isinstance(p, tuple)])["TensorrtExecutionProvider"]
        assert set(trt) <= TRT_OPTION_KEYS, set(trt) - TRT_OPTION_KEYS
        self.seen.append({"options": trt, "tensorrt_imported": "tensorrt" in sys.modules})
        self._sess = self.real(path, sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def __getattr__(self, name):
        return getattr(self._sess, name)


def _fake_trt_onnxruntime(monkeypatch, cache):
    import onnxruntime as ort

    _TrtDroppedSession.seen, _TrtDroppedSession.real = [], ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _TrtDroppedSession)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # the engine cache folder is made here


def test_dropped_tensorrt_provider_names_libnvinfer(tmp_path, monkeypatch):
    from edgekit.runtimes.base import load
    from edgekit.runtimes.ort_gpu import TensorrtDevice

    _fake_trt_onnxruntime(monkeypatch, tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # no tensorrt package: `import tensorrt` fails
    onnx = tiny_classifier(tmp_path / "tiny")
    with pytest.raises(EdgekitError) as err:
        load(onnx, device=TensorrtDevice(fp16=True))
    assert "fell back to CUDAExecutionProvider" in str(err.value)
    assert "libnvinfer.so.10" in err.value.hint and "pip install tensorrt" in err.value.hint
    assert "LD_LIBRARY_PATH" in err.value.hint and "version" not in err.value.hint
    assert _TrtDroppedSession.seen[-1]["options"]["trt_fp16_enable"] is True  # --fp16 reached the provider
    # the pip wheel: importing it loads libnvinfer from tensorrt_libs, before the session is created
    monkeypatch.delitem(sys.modules, "tensorrt")  # undone in reverse: sys.modules ends as it was
    fake = tmp_path / "fake_trt"
    fake.mkdir()
    (fake / "tensorrt.py").write_text('"""Stands in for the pip tensorrt wheel, whose import loads libnvinfer '
                                      'from tensorrt_libs."""\n__version__ = "10.0.0"\n')
    monkeypatch.syspath_prepend(str(fake))
    with pytest.raises(EdgekitError) as err:  # still dropped although libnvinfer loaded: a version mismatch
        load(onnx, device="tensorrt")
    assert _TrtDroppedSession.seen[-1]["tensorrt_imported"] is True
    assert "versions installed match" in err.value.hint


def test_a_refused_gpu_session_leaves_no_profiler_trace(tmp_path, monkeypatch):
    """The GPU session is profiled for its placement run; when it is refused before that run (here TensorRT
    dropped), onnxruntime would write the trace as the session is dropped: it must be discarded instead."""
    import gc
    import tempfile

    from edgekit.runtimes.base import load

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where profiling_options puts the trace
    _fake_trt_onnxruntime(monkeypatch, tmp_path / "cache")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    onnx = tiny_classifier(tmp_path / "tiny")
    with pytest.raises(EdgekitError, match="fell back to CUDAExecutionProvider"):
        load(onnx, device="tensorrt")
    gc.collect()  # the session is gone: anything onnxruntime writes on its destruction is written by now
    assert list(temp.iterdir()) == []


def test_bench_fp16_reaches_the_tensorrt_provider_and_the_report(tmp_path, monkeypatch):
    import edgekit.benchmarks.bench as bench_module
    from edgekit.benchmarks.bench import BenchConfig
    from edgekit.benchmarks.targets import TargetConfig, bench_on_target
    from edgekit.runtimes.ort_gpu import model_tensorrt_options, tensorrt_device_for
    from edgekit.runtimes.tensorrt_plan import EngineOptions

    seen = {}
    monkeypatch.setattr(bench_module, "bench", lambda models, cfg, progress=None: seen.setdefault("cfg", cfg))
    onnx = tiny_classifier(tmp_path / "tiny")
    bench_on_target([onnx], BenchConfig(), TargetConfig(device="tensorrt", engine=EngineOptions(fp16=True)))
    cfg = seen["cfg"]
    assert cfg.device == "tensorrt" and cfg.fp16 is True and cfg.to_dict()["fp16"] is True
    device = tensorrt_device_for(_batches([8, 8], 1), fp16=cfg.fp16)
    assert model_tensorrt_options(onnx, device)["trt_fp16_enable"] is True
    assert device.settings()["fp16"] is True and "FP16 on" in device.method_note()
    assert "FP16 off" in tensorrt_device_for(_batches([8], 1)).method_note()


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
