"""Decoder benchmarks beyond this CPU: onnxruntime's CUDA / TensorRT providers, a Jetson, device profiles, --host.

What runs here: the refusals with the CPU build of onnxruntime (one sentence naming the [gpu] extra, exit 2), the
TensorRT profile arithmetic, the IOBinding decode loop (the cache kept in binding memory, on the CPU here), the
whole GPU bench path with onnxruntime's session standing in for a CUDA one, the memory-fit check with the KV
cache, the Jetson path with real tegrastats lines and stand-in nvpmodel/jetson_clocks, and --host against the
real sshd of test_devices_remote.py. The runs on a GPU and on a Jetson are marked and skip without one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_user_error, run_cli
from test_devices_remote import sshd  # noqa: F401 - the real sshd on 127.0.0.1 (module-scoped fixture)
from test_gpu_runtimes import TRT_OPTION_KEYS, cuda_available
from test_jetson_bench import SAMPLES, _real_lines, _script, board  # noqa: F401 - fake nvpmodel/jetson_clocks
from tiny_decoders import build
from tiny_onnx import tiny_classifier

from edgekit.benchmarks.bench import BenchConfig
from edgekit.benchmarks.targets import TargetConfig, bench_on_target
from edgekit.devices.detect import JetsonInfo, detect_jetson
from edgekit.errors import EdgekitError

SHORT = ["--prompt-len", "8", "--new-tokens", "4", "--generations", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny Llama checkpoint and its edgekit export (few training steps: these tests time, they do not score)."""
    root = tmp_path_factory.mktemp("lm")
    ckpt = build("llama", root / "ckpt", steps=5)
    run_cli("export", ckpt, "-o", root / "onnx")
    return {"ckpt": ckpt, "onnx": root / "onnx"}


def _has(provider: str) -> bool:
    import onnxruntime as ort

    return provider in ort.get_available_providers()


# ---- refusals with the CPU build of onnxruntime ---------------------------------------------------------


@pytest.mark.parametrize("device, provider", [("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")])
def test_gpu_device_without_the_gpu_build_exits_2(lm, device, provider):
    if _has(provider):
        pytest.skip(f"this onnxruntime has {provider}")
    r = run_cli("bench", lm["onnx"], "--device", device, *SHORT, expect=None)
    assert_user_error(r, provider, "pip install 'edgekit-transformers[gpu]'")


def test_decoder_target_refusals(lm, text_onnx):
    r = run_cli("bench", lm["ckpt"], "--device", "cuda", *SHORT, expect=None)
    assert_user_error(r, "is a checkpoint, which edgekit runs on torch on the CPU only", "edgekit export")
    r = run_cli("bench", lm["onnx"], "--device", "cuda", "--runtime", "tensorrt", *SHORT, expect=None)
    assert_user_error(r, "native TensorRT engines for encoders only", "--device tensorrt")
    assert_user_error(run_cli("bench", lm["onnx"], text_onnx, "--device", "cuda", expect=None),
                      "mix decoder language models with encoders")
    with pytest.raises(EdgekitError, match="not on 'jetson'"):  # the API: a Jetson goes through bench_on_target
        from edgekit.benchmarks.decode import bench_decoders

        bench_decoders([lm["onnx"]], BenchConfig(device="jetson"))


# ---- TensorRT profile and the IOBinding decode loop ------------------------------------------------------


def _run_shapes(onnx_inputs: dict, prompt: int, total: int) -> list[dict]:
    """Every shape a greedy generation feeds: the prefill on an empty cache, then one token per step."""
    def shapes(new, past):
        out = {}
        for name, dims in onnx_inputs.items():
            if name.startswith("past_key_values."):
                out[name] = (1, dims[1], past, dims[3])
            else:
                out[name] = (1, past + new if name == "attention_mask" else new)
        return out

    return [shapes(prompt, 0)] + [shapes(1, past) for past in range(prompt, total)]


def _one_profile(text: str) -> dict:
    """A trt_profile_*_shapes value read as onnxruntime's TensorRT provider reads it (ParseProfileShapes: "name:AxB"
    entries, each dim through std::stoi, so 0 is a dim; a name given twice would open a second profile)."""
    entries = [e.rpartition(":") for e in text.split(",")]
    names = [n for n, _, _ in entries]
    assert len(names) == len(set(names)), "one profile: each input once"
    return {n: tuple(int(d) for d in dims.split("x")) for n, _, dims in entries}


def test_tensorrt_profile_covers_the_prefill_and_every_step(lm):
    from edgekit.runtimes.decoder import tensorrt_profile
    from edgekit.runtimes.tensorrt import read_onnx_summary

    inputs = {i.name: i.shape for i in read_onnx_summary(lm["onnx"] / "model.onnx").inputs}
    assert any(n.startswith("past_key_values.") for n in inputs) and "attention_mask" in inputs
    for prompt, total in ((12, 20), (1, 2), (7, 7), (128, 256)):
        opts = tensorrt_profile(inputs, prompt, total)
        assert set(opts) <= TRT_OPTION_KEYS
        lo, opt, hi = (_one_profile(opts[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max"))
        assert set(lo) == set(opt) == set(hi) == set(inputs)  # the provider wants every dynamic input profiled
        assert lo["past_key_values.0.key"] == (1, 2, 0, 16)  # an empty cache is the smallest past
        for shape in _run_shapes(inputs, prompt, total):
            for name, dims in shape.items():
                assert all(a <= d <= c for a, d, c in zip(lo[name], dims, hi[name])), (prompt, total, name, dims)
        # TensorRT checks min, opt and max against the graph's constraints: the mask is cache + new tokens long
        for profile in (lo, opt, hi):
            assert profile["attention_mask"][1] == profile["past_key_values.0.key"][2] + profile["input_ids"][1]
            assert all(a <= d <= c for n in inputs for a, d, c in zip(lo[n], profile[n], hi[n]))
        assert opt["input_ids"] == (1, 1)  # tuned for a decode step, the bulk of the work
    with pytest.raises(ValueError):
        tensorrt_profile(inputs, 9, 8)


def test_iobinding_decode_keeps_the_cache_bound_and_gives_the_same_tokens(lm):
    import onnxruntime as ort

    from edgekit.runtimes.decoder import OrtDecoder, greedy

    plain, bound = OrtDecoder(lm["onnx"], 1), OrtDecoder(lm["onnx"], 1, bind_memory="cpu")
    prompt = [1, 5, 6, 7, 8, 9]
    assert greedy(bound, prompt, 10)["tokens"] == greedy(plain, prompt, 10)["tokens"]
    phases = bound.take_phases()
    assert len(phases) == 10 and bound.take_phases() == []  # the prefill, then 9 steps
    assert all(set(p) == {"h2d_ms", "compute_ms", "d2h_ms"} and min(p.values()) >= 0 for p in phases)
    ids = np.asarray([prompt], np.int64)
    _, past = bound.forward(ids, np.ones_like(ids), None)
    assert past and all(isinstance(v, ort.OrtValue) for v in past.values())  # never copied back to numpy
    assert bound.kv_bytes(20) == 2 * 2 * 2 * 20 * 16 * 4  # 2 layers x (key, value) x 2 heads x 20 x 16 x fp32


# ---- the GPU path, with onnxruntime's CPU session standing in for a CUDA / TensorRT one ------------------


class _FakeGpuSession:
    """onnxruntime.InferenceSession as onnxruntime-gpu creates it with the providers asked for: it reports them
    active. The provider options are checked against the TensorRT provider's documented keys (onnxruntime refuses
    unknown ones); the graph runs on the real CPU onnxruntime."""

    seen: list = []
    real = None

    def __init__(self, path, sess_options=None, providers=None):
        options = dict(p for p in providers if isinstance(p, tuple))
        assert set(options.get("TensorrtExecutionProvider", {})) <= TRT_OPTION_KEYS
        self.seen.append(options)
        self._active = [p[0] if isinstance(p, tuple) else p for p in providers]
        self._sess = self.real(path, sess_options, providers=["CPUExecutionProvider"])

    def get_providers(self):
        return self._active

    def __getattr__(self, name):
        return getattr(self._sess, name)


def _fake_gpu_onnxruntime(patch) -> None:
    """``patch(obj, name, value)``: pytest's monkeypatch.setattr, or setattr in a spawned worker."""
    import onnxruntime as ort

    from edgekit.runtimes import decoder

    _FakeGpuSession.seen, _FakeGpuSession.real = [], ort.InferenceSession
    patch(ort, "get_available_providers",
          lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    patch(ort, "InferenceSession", _FakeGpuSession)
    patch(decoder, "GPU_MEMORY", "cpu")  # the cache stays in "device" memory: the CPU's, here


def _fake_gpu_serve(conn, *args):
    """Spawned decode worker with the fake GPU onnxruntime."""
    _fake_gpu_onnxruntime(setattr)
    from edgekit.benchmarks.decode import serve

    serve(conn, *args)


def test_tensorrt_provider_options_of_a_decoder_session(lm, tmp_path, monkeypatch):
    from edgekit.runtimes.decoder import OrtDecoder, greedy
    from edgekit.runtimes.ort_gpu import TensorrtDevice

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the engine cache folder is made there
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # no TensorRT Python package to preload
    _fake_gpu_onnxruntime(monkeypatch.setattr)
    session = OrtDecoder(lm["onnx"], 1, TensorrtDevice(fp16=True), lengths=(8, 12))
    trt = _FakeGpuSession.seen[-1]["TensorrtExecutionProvider"]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_enable"] is True
    assert Path(trt["trt_engine_cache_path"]).is_dir() and "trt_int8_enable" not in trt
    assert _one_profile(trt["trt_profile_max_shapes"])["input_ids"] == (1, 8)
    assert session.name == "onnxruntime-tensorrt" and session.bind_memory == "cpu"
    assert session.info["placement"]["nodes"] > 0  # the placement run was a real prefill
    assert len(greedy(session, [1, 5, 6, 7, 8, 9, 10, 11], 4)["tokens"]) == 4


def test_a_refused_gpu_decoder_session_leaves_no_profiler_trace(lm, tmp_path, monkeypatch):
    import gc
    import tempfile

    from edgekit.runtimes.decoder import OrtDecoder

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where profiling_options puts the trace
    _fake_gpu_onnxruntime(monkeypatch.setattr)
    encoder = tiny_classifier(tmp_path / "enc")
    with pytest.raises(EdgekitError, match="is not a decoder with a KV cache"):
        OrtDecoder(encoder, 1, "cuda")
    gc.collect()
    assert list(temp.iterdir()) == []


def test_decoder_bench_on_the_gpu_path(lm, monkeypatch):
    """The whole bench on --device cuda: workers, phases, the device block and its hardware label, the report."""
    from edgekit.benchmarks import decode
    from edgekit.reports import to_markdown

    monkeypatch.setattr(decode, "serve", _fake_gpu_serve)
    cfg = BenchConfig(prompt_len=8, new_tokens=5, generations=3, threads=1)
    report = bench_on_target([lm["onnx"]], cfg, TargetConfig(device="cuda")).to_dict()
    v = report["variants"][0]
    assert v["runtime"] == "onnxruntime-cuda" and v["decode_tokens_per_s_p50"] > 0
    dev = v["device"]
    assert dev["verified_on_hardware"] is False and "not yet run on real hardware" in dev["hardware_note"]
    assert dev["runs_with_phases"] == 3 * 4  # 4 decode steps per generation (the prefill gives the first token)
    assert dev["prefill_phases"]["compute_ms"]["p50"] > 0 and dev["phases"]["compute_ms"]["p50"] > 0
    assert dev["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"] and dev["nodes"] > 0
    assert dev["gpu_memory_bytes"] is None or dev["gpu_memory_bytes"] >= 0
    assert report["environment"]["device"] == "cuda" and "IOBinding" in report["method"]
    md = to_markdown(decode.DecodeBenchReport.sections_of(report))
    assert "UNVERIFIED ON HARDWARE: edgekit's decoder onnxruntime-cuda path" in md
    assert "compute p50 (ms)" in md  # the device table


# ---- device profiles: the memory-fit check counts the KV cache -------------------------------------------


def test_kv_cache_layout_and_bytes(lm, tmp_path):
    from edgekit.runtimes.decoder import cache_layout

    assert cache_layout(lm["onnx"]) == cache_layout(lm["ckpt"])  # the graph and the config agree
    # Qwen2.5-0.5B's published config: 24 layers, 2 KV heads of 64 (896 / 14), FP32 cache as torch runs it
    qwen = tmp_path / "qwen"
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 24,
                                                  "num_attention_heads": 14, "num_key_value_heads": 2,
                                                  "hidden_size": 896, "max_position_embeddings": 32768}))
    assert cache_layout(qwen).bytes_at(32768) == 2 * 24 * 2 * 64 * 32768 * 4 == 768 * 2**20


def test_a_decoder_whose_cache_cannot_fit_is_refused_before_anything_is_copied(lm, tmp_path):
    from edgekit.artifacts import folder_size
    from edgekit.benchmarks.targets import check_decoders_fit, check_models_fit, fit_profile, resolve_target
    from edgekit.devices.profiles import GIB
    from edgekit.runtimes.decoder import cache_layout

    kv = cache_layout(lm["onnx"]).bytes_at(8 + 24)
    # 1 GiB of L4T reserve, 1 GiB of runtime, the weights twice, and half the cache: fits only without the cache
    budget = (2 * GIB + 2 * folder_size(lm["onnx"]) + kv // 2) / GIB
    target = resolve_target("jetson-orin-nano-4gb")
    profile = fit_profile(target, TargetConfig(device=target.profile.name, memory_budget_gb=budget))
    check_models_fit([lm["onnx"]], profile)  # the encoders' check passes: the cache is what does not fit
    with pytest.raises(EdgekitError, match=r"KV cache of 32 tokens at batch 1"):
        check_decoders_fit([lm["onnx"]], BenchConfig(prompt_len=8, new_tokens=24), profile)
    check_decoders_fit([lm["onnx"]], BenchConfig(prompt_len=8, new_tokens=4), profile)  # a shorter run fits
    nobody = "root@127.0.0.1:9"  # reaching it would be another error: the refusal comes first
    r = run_cli("bench", lm["onnx"], "--device", "jetson-orin-nano-4gb", "--memory-budget", repr(budget), "--host",
                nobody, "--key", tmp_path / "no-key", "--prompt-len", "8", "--new-tokens", "24", expect=None)
    line = assert_user_error(r, "jetson-orin-nano-4gb has about", "KV cache of 32 tokens", "lower --prompt-len")
    assert "cannot reach" not in line


# ---- Jetson: tegrastats during the timed generations, the power mode recorded ----------------------------


@pytest.mark.skipif(not SAMPLES.is_file(), reason="needs the shared real tegrastats samples")
def test_jetson_decoder_bench_samples_tegrastats_and_records_the_power_mode(lm, board, tmp_path):  # noqa: F811
    from edgekit.benchmarks.decode import DecodeBenchReport
    from edgekit.benchmarks.jetson import bench_jetson
    from edgekit.reports import to_markdown

    lines = _real_lines("orin jetpack-6", "thor", "xavier-nx")
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    fake = _script(board.bin / "tegrastats", f"cat {tmp_path / 'lines.txt'}\nexec sleep 60\n")
    info = JetsonInfo(model="NVIDIA Jetson Orin Nano Developer Kit", l4t="36.4.3", jetpack="6.2",
                      profile="jetson-orin-nano-8gb")
    cfg = BenchConfig(prompt_len=16, new_tokens=16, generations=20, threads=1)
    tcfg = TargetConfig(device="jetson", compute="cpu", tegrastats=str(fake), interval_ms=50, lock_clocks=True,
                        power_mode=2)
    report = bench_jetson([lm["onnx"]], cfg, tcfg, jetson=info, meminfo=str(tmp_path / "none"), decoder=True).to_dict()
    v = report["variants"][0]
    js = v["device"]["jetson"]
    ts = js["tegrastats"]
    assert ts["n_samples"] == 3 and ts["n_inferences"] == 20 * 16  # energy per generated token
    assert ts["ram_peak_mb"] == 4722 and ts["module_power_mean_mw"] == 5079
    assert ts["energy_per_inference_mj"] == pytest.approx(5079 * ts["wall_seconds"] / (20 * 16))
    assert js["energy_per"].startswith("generated token") and js["verified_on_hardware"] is False
    env = report["environment"]
    # the mode the run had (jetson-containers#412: tokens/s nobody could reproduce without it), not the restored one
    assert env["jetson"]["power_mode_observed"] == {"name": "MAXN", "id": 2} and env["jetson"]["clocks_locked"]
    assert board.state.read_text().strip() == "0"
    assert v["decode_tokens_per_s_p50"] > 0 and "per generated token" not in report["method"]
    assert "energy per token" in report["method"]
    md = to_markdown(DecodeBenchReport.sections_of(report))
    assert "energy (mJ/token)" in md and "UNVERIFIED ON HARDWARE: edgekit's decoder jetson path" in md


# ---- --host: the bench runs on the other side of a real SSH connection -----------------------------------


def test_remote_args_for_decoders():
    from edgekit.benchmarks.jetson import remote_bench_args
    from edgekit.benchmarks.targets import resolve_target

    cfg = BenchConfig(prompt_len=32, new_tokens=16, generations=3, data="d.txt", text_column="text")
    gpu = remote_bench_args(cfg, TargetConfig(device="jetson", lock_clocks=True), resolve_target("jetson"), True)
    assert gpu == ["--new-tokens", "16", "--generations", "3", "--prompt-len", "32", "--text-column", "text",
                   "--device", "jetson", "--lock-clocks"]  # no --runtime: the device picks onnxruntime for decoders
    cpu = remote_bench_args(cfg, TargetConfig(device="jetson", compute="cpu"), resolve_target("jetson"), True)
    assert cpu[-2:] == ["--device", "cpu"] and "--iterations" not in cpu
    trt = remote_bench_args(BenchConfig(), TargetConfig(device="tensorrt"), resolve_target("tensorrt"), True)
    assert trt[-2:] == ["--device", "tensorrt"] and "--prompt-len" not in trt


def test_remote_decoder_bench_over_real_ssh(lm, sshd, tmp_path):  # noqa: F811
    ssh = ["--host", f"{sshd.user}@127.0.0.1:{sshd.port}", "--key", sshd.key, "--known-hosts", sshd.known_hosts,
           "--remote-python", sys.executable]
    # The "device" is this machine's CPU cores, through the Jetson path's SSH copy and remote edgekit bench.
    # one remote run: the table on stdout and the JSON report in a file
    table = run_cli("bench", lm["onnx"], "--device", "jetson", "--compute", "cpu", *ssh, *SHORT, "--json",
                    tmp_path / "remote.json").stdout
    assert "Decode benchmark" in table and "Measured on" in table
    report = json.loads((tmp_path / "remote.json").read_text())
    v = report["variants"][0]
    assert v["ttft_p50_ms"] > 0 and v["decode_tokens_per_s_p50"] > 0 and v["generations"] == 2
    assert report["inputs"]["prompt_tokens"] == 8 and report["inputs"]["new_tokens"] == 4
    assert v["path"] != str(lm["onnx"]) and "edgekit-bench-" in v["path"]  # the device benched its own copy
    assert report["remote"]["bench_args"][-2:] == ["--device", "cpu"]
    if not _has("CUDAExecutionProvider"):  # the device's one-sentence refusal travels back whole
        r = run_cli("bench", lm["onnx"], "--device", "cuda", *ssh, *SHORT, expect=None)
        assert_user_error(r, "stopped: the installed onnxruntime has no CUDAExecutionProvider",
                          "edgekit-transformers[gpu]")


# ---- on real hardware ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="needs an NVIDIA GPU with onnxruntime-gpu")
@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_decoder_bench_on_a_gpu(lm, device):
    if not _has({"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[device]):
        pytest.skip(f"this onnxruntime-gpu has no {device} provider")
    from edgekit.runtimes.decoder import OrtDecoder, greedy

    prompt = [1, 5, 6, 7, 8, 9, 10, 11]
    gpu = OrtDecoder(lm["onnx"], device=device, lengths=(8, 16))
    assert greedy(gpu, prompt, 8)["tokens"] == greedy(OrtDecoder(lm["onnx"]), prompt, 8)["tokens"]
    d = json.loads(run_cli("bench", lm["onnx"], "--device", device, "--prompt-len", "8", "--new-tokens", "8",
                           "--json").stdout)
    dev = d["variants"][0]["device"]
    assert dev["phases"]["compute_ms"]["p50"] > 0 and dev["verified_on_hardware"] is False


@pytest.mark.jetson
@pytest.mark.skipif(detect_jetson() is None or importlib.util.find_spec("onnxruntime") is None,
                    reason="needs a Jetson with onnxruntime-gpu (the Jetson Zoo wheel)")
def test_decoder_bench_on_a_jetson(lm):
    d = json.loads(run_cli("bench", lm["onnx"], "--device", "jetson", "--prompt-len", "8", "--new-tokens", "16",
                           "--generations", "10", "--json").stdout)
    ts = d["variants"][0]["device"]["jetson"]["tegrastats"]
    assert ts["n_samples"] > 0 and d["environment"]["jetson"]["power_mode_observed"] is not None
