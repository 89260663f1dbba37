"""GPU packaging and the facts around a GPU run that can be checked without one (issue 12, parts 2, 3, 13, 14).

- One onnxruntime build: a real second distribution's metadata beside the installed one, and pip's real
  resolution of ``edgekit-transformers[gpu]`` and ``[jetson]`` for an empty environment.
- cuda-python: the real bindings on this GPU-less machine (no driver), and bindings newer than a driver.
- NVML's device for CUDA device 0, matched by UUID.
- The nodes onnxruntime places on the CPU, from its real profiler.
- verify on the TensorRT provider: a profile covering --batch-size and the evaluation's length.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_user_error, run_cli
from tiny_onnx import tiny_classifier

from edgekit.errors import EdgekitError

REPO = Path(__file__).resolve().parents[1]


# ---- one onnxruntime build ---------------------------------------------------------------------------------


def _fake_dist(site: Path, name: str, version: str = "1.31.1") -> None:
    """A second onnxruntime build's installed metadata (what pip leaves in site-packages: NAME-VER.dist-info)."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_two_onnxruntime_builds_are_refused_before_anything_runs(text_onnx, tmp_path, monkeypatch):
    from edgekit.runtimes.ort_gpu import ort_distributions

    assert ort_distributions() == ["onnxruntime"]  # what .ci/run installs: the CPU build alone
    _fake_dist(tmp_path / "site", "onnxruntime-gpu")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert ort_distributions() == ["onnxruntime", "onnxruntime-gpu"]
    r = run_cli("quantize", text_onnx, "-o", tmp_path / "out", expect=None)
    line = assert_user_error(r, "onnxruntime and onnxruntime-gpu are both installed",
                             "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")
    assert "[gpu]" not in line  # the old hint reinstalled the CPU build through the core dependency
    assert not (tmp_path / "out").exists()
    r = run_cli("bench", text_onnx, "--iterations", "2", "--min-seconds", "0", expect=None)
    assert_user_error(r, "both installed")


def test_gpu_hint_does_not_reinstall_the_cpu_build():
    from edgekit.runtimes.ort_gpu import GPU_HINT

    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in GPU_HINT


def test_pyproject_keeps_onnxruntime_out_of_the_core_and_the_jetson_extras():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = [d.split(";")[0].replace(" ", "") for d in project["dependencies"]]
    assert not [d for d in core if d.startswith("onnxruntime")], core
    extras = project["optional-dependencies"]
    for name in ("jetson", "jetson-thor"):  # the Jetson Zoo wheel must never be replaced
        assert not [d for d in extras[name] if d.startswith("onnxruntime")], extras[name]
    for name, major in (("gpu", 12), ("tensorrt", 12), ("jetson", 12), ("tensorrt-cuda13", 13), ("jetson-thor", 13)):
        pins = [d for d in extras[name] if d.startswith("cuda-python")]
        assert pins == [f"cuda-python>={major}.6,<{major + 1}" if major == 12 else f"cuda-python>={major},<{major + 1}"]


def _registry_reachable(python: Path) -> bool:
    r = subprocess.run([str(python), "-m", "pip", "index", "versions", "onnxruntime-gpu"], capture_output=True,
                       text=True, timeout=120)
    return r.returncode == 0 and "onnxruntime-gpu" in r.stdout


def _install_sets(src: Path, extras: list[str], folder: Path) -> dict[str, set[str]]:
    """What pip would install for each ``src[extra]`` into an empty environment (resolved against the real
    registry, torch's CPU build pinned first as the README says): the distributions a fresh venv ends up with.
    The resolutions run side by side (about 15 s of CPU each)."""
    procs = {}
    for extra in extras:
        report = folder / f"{extra}.json"
        procs[extra] = (report, subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--dry-run",
             "--ignore-installed", "--report", str(report), "torch==2.13.0", f"{src}[{extra}]"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    out = {}
    for extra, (report, proc) in procs.items():
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"pip could not resolve [{extra}]: {err[-2000:]}"
        out[extra] = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    return out


def test_gpu_extra_resolves_to_exactly_one_onnxruntime_and_jetson_to_none(tmp_path):
    """pip's resolver, for real, for an empty environment: '[gpu]' brings onnxruntime-gpu and not the CPU build
    (which would overwrite it, onnxruntime#7748); '[jetson]' brings no onnxruntime at all, so the Jetson Zoo's
    wheel is never replaced. (A real install of '[gpu]' into a fresh venv gave the same set on 2026-12-02; the
    resolution is what decides it and takes a tenth of the time.)"""
    if not _registry_reachable(Path(sys.executable)):
        pytest.skip("the package registry is not reachable from here: cannot resolve edgekit-transformers[gpu]")
    src = tmp_path / "src"  # a copy: pip's metadata build must not write into the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", "build"))
    sets = _install_sets(src, ["gpu", "jetson"], tmp_path)
    gpu, jetson = sets["gpu"], sets["jetson"]
    assert {n for n in gpu if n.startswith("onnxruntime")} == {"onnxruntime-gpu"}, gpu
    assert "torch" in gpu and "edgekit-transformers" in gpu
    assert not {n for n in jetson if n.startswith("onnxruntime")}, jetson


# ---- cuda-python -------------------------------------------------------------------------------------------


def test_real_cuda_bindings_without_a_driver_say_no_gpu():
    """The real cuda-bindings (the test extra installs them) on this machine, which has no NVIDIA driver:
    every runtime call returns cudaErrorInsufficientDriver and the driver reports CUDA 0."""
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed (pip install -e '.[test]')")
    from edgekit.runtimes import cuda_rt

    rt = cuda_rt.cudart()
    with pytest.raises(EdgekitError) as e:
        cuda_rt.call(rt.cudaGetDeviceCount())
    assert "no NVIDIA driver is loaded" in e.value.message and "--device cpu" in e.value.hint


class _BindingsNewerThanDriver:
    """cuda-bindings 13 on a JetPack 6 (CUDA 12.6) driver, as cuda-bindings' 13.0.0 release notes describe it:
    the runtime is CUDA 13.0, cudaDriverGetVersion succeeds with 12060, every other call returns
    cudaErrorInsufficientDriver (35). Enum names are cuda-bindings' own."""

    class cudaError_t:  # noqa: N801 (cuda-bindings' name)
        class _E:
            def __init__(self, name):
                self.name = name

        cudaSuccess = _E("cudaSuccess")
        cudaErrorInsufficientDriver = _E("cudaErrorInsufficientDriver")

    def cudaDriverGetVersion(self):  # noqa: N802
        return self.cudaError_t.cudaSuccess, 12060

    def cudaRuntimeGetVersion(self):  # noqa: N802
        return self.cudaError_t.cudaSuccess, 13000

    def cudaGetDeviceCount(self):  # noqa: N802
        return self.cudaError_t.cudaErrorInsufficientDriver, None


def test_bindings_newer_than_the_driver_name_the_real_cause(monkeypatch):
    from edgekit.runtimes import cuda_rt

    fake = _BindingsNewerThanDriver()
    monkeypatch.setattr(cuda_rt, "cudart", lambda: fake)
    with pytest.raises(EdgekitError) as e:
        cuda_rt.call(fake.cudaGetDeviceCount())
    assert "built for CUDA runtime 13.0" in e.value.message and "supports CUDA 12.6 only" in e.value.message
    assert "cudaErrorInsufficientDriver" in e.value.message
    assert "pip install 'cuda-python>=12,<13'" in e.value.hint
    assert "no usable NVIDIA GPU" not in e.value.message  # the old message sent the user to --device cpu


def test_stream_handle_uses_the_native_handle_helper():
    runtime = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from edgekit.runtimes.cuda_rt import native_handle

    assert native_handle(runtime.cudaStream_t(0x1234)) == 0x1234


# ---- NVML by UUID ------------------------------------------------------------------------------------------


class _TwoGpuNvml:
    """pynvml (nvidia-ml-py) on a machine with two different GPUs. NVML numbers devices by PCI bus id and
    ignores CUDA_VISIBLE_DEVICES (NVML API reference, nvmlDeviceGetHandleByIndex); nvmlDeviceGetUUID returns
    "GPU-" and the UUID, the same UUID that cudaDeviceProp.uuid holds as 16 bytes."""

    UUIDS = ["GPU-11111111-2222-3333-4444-555555555555", "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"]

    def __init__(self, count=2):
        self.count = count

    def nvmlDeviceGetCount(self):  # noqa: N802
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i):  # noqa: N802
        return ("handle", i)

    def nvmlDeviceGetUUID(self, h):  # noqa: N802
        return self.UUIDS[h[1]]


def test_nvml_device_is_matched_by_uuid_not_index(monkeypatch):
    from edgekit.benchmarks.gpu import nvml_handle
    from edgekit.runtimes.cuda_rt import format_uuid

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    nvml = _TwoGpuNvml()
    # CUDA orders fastest first: its device 0 is NVML's device 1.
    cuda0 = format_uuid(bytes.fromhex("aaaaaaaabbbbccccddddeeeeeeeeeeee"))
    assert cuda0 == _TwoGpuNvml.UUIDS[1]
    assert nvml_handle(nvml, lambda: cuda0) == (("handle", 1), "UUID of CUDA device 0")
    # No UUID from CUDA: CUDA_VISIBLE_DEVICES naming a UUID prefix, then PCI order, then an honest "cannot tell".
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaaaaaa")
    assert nvml_handle(nvml, lambda: None) == (("handle", 1), "UUID in CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    handle, why = nvml_handle(nvml, lambda: None)
    assert handle is None and "cannot be told" in why
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert nvml_handle(nvml, lambda: None) == (("handle", 1), "PCI order (CUDA_DEVICE_ORDER=PCI_BUS_ID)")
    assert nvml_handle(_TwoGpuNvml(count=1), lambda: None) == (("handle", 0), "the only GPU")


# ---- nodes onnxruntime places on the CPU -------------------------------------------------------------------


def test_node_placement_from_the_real_profiler(text_onnx, tmp_path):
    import onnxruntime as ort

    from edgekit.runtimes.ort_gpu import node_placement, placement_inputs, profiling_options
    from edgekit.runtimes.ort_runtime import session_options

    so = profiling_options(session_options(1), tmp_path)
    sess = ort.InferenceSession(str(text_onnx / "model.onnx"), so, providers=["CPUExecutionProvider"])
    placement = node_placement(sess, placement_inputs(sess, 2, 7))
    assert placement["nodes"] > 10 and placement["cpu_nodes"] == placement["nodes"]
    assert placement["nodes_by_provider"] == {"CPUExecutionProvider": placement["nodes"]}
    assert list(tmp_path.iterdir()) == []  # the trace is deleted
    sess.run(None, placement_inputs(sess, 1, 5))
    assert sess.end_profiling() == ""  # the profiler is off for the timed runs


def test_cpu_nodes_column_beside_gpu_figures():
    from edgekit.benchmarks.bench import DEVICE_COLUMNS
    from edgekit.benchmarks.gpu import device_metrics

    dev = device_metrics([], {"nodes_by_provider": {"CPUExecutionProvider": 3, "CUDAExecutionProvider": 40},
                              "cpu_nodes": 3, "nodes": 43})
    cell = dict(DEVICE_COLUMNS)["CPU nodes"]
    assert cell(dev) == "3/43" and cell({}) == "-"


# ---- session-creation failures by cause --------------------------------------------------------------------


def _one_node_model(path: Path, op: str, dtype, domain: str = "", opset: int = 17) -> Path:
    import onnx
    from onnx import helper

    x = helper.make_tensor_value_info("x", dtype, [2])
    y = helper.make_tensor_value_info("y", dtype, [2])
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"], domain=domain)], "g", [x], [y])
    path.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=imports), path / "model.onnx")
    return path


@pytest.mark.parametrize("case, fragment", [
    ("garbage", "model.onnx is not a valid ONNX model (Protobuf parsing failed.)"),
    ("no-kernel", "has no kernel on 'cpu' for an operator"),
    ("opset", "Opset 99 is under development"),
])
def test_session_failures_are_told_apart(tmp_path, case, fragment):
    from onnx import TensorProto

    from edgekit.runtimes.ort_runtime import load_onnxruntime

    if case == "garbage":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model.onnx").write_bytes(b"not a model")
        folder = tmp_path / "m"
    elif case == "no-kernel":  # com.microsoft Gelu has no double kernel on the CPU
        folder = _one_node_model(tmp_path / "m", "Gelu", TensorProto.DOUBLE, "com.microsoft")
    else:
        folder = _one_node_model(tmp_path / "m", "Relu", TensorProto.FLOAT, opset=99)
    with pytest.raises(EdgekitError) as e:
        load_onnxruntime(folder, task="text-classification")
    assert fragment in e.value.message, e.value.message
    assert len(e.value.message) < 300 and "onnxruntime_src" not in e.value.message


# ---- verify on the TensorRT provider -----------------------------------------------------------------------


def test_verify_profile_covers_its_batches_on_the_tensorrt_provider(tmp_path):
    from edgekit.runtimes.ort_gpu import TensorrtDevice, model_tensorrt_options
    from edgekit.verify import VerifyConfig, _candidate_device

    cfg = VerifyConfig(data="x.tsv", batch_size=64, device="tensorrt")
    dev = _candidate_device(cfg, 256)
    assert isinstance(dev, TensorrtDevice) and dev == "tensorrt"
    assert (dev.batch, dev.seq) == ((1, 64, 64), (1, 256, 256))
    opts = model_tensorrt_options(tiny_classifier(tmp_path / "m"), dev)
    assert "input_ids:64x256" in opts["trt_profile_max_shapes"]  # the default profile stopped at 32x128
    assert _candidate_device(VerifyConfig(data="x.tsv", batch_size=64), 256) == "cpu"
