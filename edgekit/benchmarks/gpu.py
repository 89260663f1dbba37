"""GPU measurements beside the timing loop: phase timings, device memory, the GPU in the environment block.

- Phases: a GPU session may offer ``timed_run(inputs) -> {h2d_ms, compute_ms, d2h_ms}`` (TensorRT: CUDA
  events on its stream; onnxruntime: host timers around synchronous IOBinding calls). The worker uses it
  when present; the wall-clock latency stays the headline figure, the phases explain it.
- Memory on a discrete GPU: NVML's per-process figure (nvidia-ml-py), read in the worker process itself.
  NVML is absent on Jetson, where CPU and GPU share the RAM: memory there comes from tegrastats and RSS
  (benchmarks/jetson.py). TensorRT's activation memory comes from the engine.
- Environment: GPU name, driver, CUDA driver version, SM and memory clocks (current and max) from NVML.
"""

from __future__ import annotations

import os
from importlib import metadata

import numpy as np

GPU_LIBRARIES = ("tensorrt", "onnxruntime", "onnxruntime-gpu", "cuda-python", "cuda-bindings", "nvidia-ml-py")


def _nvml():
    """The pynvml module (package nvidia-ml-py), initialised; None with a reason when unavailable."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install 'edgekit-transformers[gpu]')"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver, or a Jetson (no NVML there)
        return None, f"NVML is not available ({exc})"
    return pynvml, None


def _torch_cuda_uuid() -> str | None:
    """CUDA device 0's UUID from torch, only when this process already runs torch on CUDA (asking would
    otherwise create a CUDA context of a few hundred MB in a process that measures something else)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    from edgekit.runtimes.cuda_rt import format_uuid

    uuid = torch.cuda.get_device_properties(0).uuid
    return format_uuid(getattr(uuid, "bytes", None) or str(uuid))


def cuda0_uuid() -> str | None:
    from edgekit.runtimes.cuda_rt import device_uuid

    return _torch_cuda_uuid() or device_uuid(0)


def nvml_handle(nvml, uuid_of_cuda0=cuda0_uuid):
    """NVML's handle for CUDA device 0 of this process, and how it was matched.

    CUDA numbers devices fastest first (unless CUDA_DEVICE_ORDER=PCI_BUS_ID) and after CUDA_VISIBLE_DEVICES;
    NVML numbers them by PCI bus and ignores CUDA_VISIBLE_DEVICES. So index 0 is not the same GPU on a
    machine with two different GPUs: match by UUID, which both APIs report.
    """
    count = nvml.nvmlDeviceGetCount()
    handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

    def by_uuid(uuid: str):
        want = uuid.lower()
        for h in handles:
            got = nvml.nvmlDeviceGetUUID(h)
            got = got.decode() if isinstance(got, bytes) else got
            if got.lower().startswith(want):  # CUDA_VISIBLE_DEVICES may hold a UUID prefix
                return h
        return None

    uuid = uuid_of_cuda0()
    if uuid and (h := by_uuid(uuid)) is not None:
        return h, "UUID of CUDA device 0"
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.upper().startswith("GPU-") and (h := by_uuid(first)) is not None:
        return h, "UUID in CUDA_VISIBLE_DEVICES"
    if count == 1:
        return handles[0], "the only GPU"
    if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        index = int(first) if first.isdigit() else 0
        if index < count:
            return handles[index], "PCI order (CUDA_DEVICE_ORDER=PCI_BUS_ID)"
    return None, (f"{count} GPUs and no UUID for CUDA device 0 (cuda-python not installed): which NVML device "
                  "it is cannot be told; set CUDA_DEVICE_ORDER=PCI_BUS_ID or install cuda-python")


def process_gpu_memory(pid: int | None = None) -> dict:
    """This process's device memory as NVML sees it: {'bytes': int | None, 'note': str | None}."""
    nvml, why = _nvml()
    if nvml is None:
        return {"bytes": None, "note": why}
    pid = pid or os.getpid()
    try:
        used = 0
        found = False
        for i in range(nvml.nvmlDeviceGetCount()):
            for proc in nvml.nvmlDeviceGetComputeRunningProcesses(nvml.nvmlDeviceGetHandleByIndex(i)):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    used, found = used + int(proc.usedGpuMemory), True
        if not found:
            # In a container NVML reports host PIDs, which do not match ours.
            return {"bytes": None, "note": "NVML lists no compute process with this PID (a container's PID namespace?)"}
        return {"bytes": used, "note": None}
    except nvml.NVMLError as exc:
        return {"bytes": None, "note": f"NVML: {exc}"}
    finally:
        nvml.nvmlShutdown()


def nvml_facts() -> dict:
    nvml, why = _nvml()
    if nvml is None:
        return {"available": False, "note": why}
    try:
        h, matched = nvml_handle(nvml)
        if h is None:
            return {"available": False, "note": matched}
        cc = nvml.nvmlDeviceGetCudaComputeCapability(h)
        cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()
        return {
            "available": True,
            "gpu_name": nvml.nvmlDeviceGetName(h),
            "compute_capability": f"{cc[0]}.{cc[1]}",
            "driver": nvml.nvmlSystemGetDriverVersion(),
            "cuda_driver": f"{cuda // 1000}.{(cuda % 1000) // 10}",
            "memory_total_bytes": int(nvml.nvmlDeviceGetMemoryInfo(h).total),
            "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
            "sm_clock_max_mhz": nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM),
            "mem_clock_max_mhz": nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_MEM),
            "matched_by": matched,
        }
    except nvml.NVMLError as exc:
        return {"available": False, "note": f"NVML: {exc}"}
    finally:
        nvml.nvmlShutdown()


def add_device_environment(env: dict, device: str) -> dict:
    """Record the device beside every figure: GPU block from NVML, Jetson block, GPU library versions."""
    from edgekit.devices.detect import detect_jetson

    env["device"] = device
    if device == "cpu":
        return env
    env["gpu"] = nvml_facts()
    jetson = detect_jetson()
    if jetson is not None:
        env["jetson"] = jetson.to_dict()
    for name in GPU_LIBRARIES:
        try:
            env["libraries"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env["libraries"].setdefault(name, None)
    return env


# The measurement paths that have run on real hardware, each with the machine and date it ran on (the README's
# "What has run where"). A path gets its entry once its hardware tests (pytest -m "gpu or jetson") passed on such
# a machine; until then every figure it produces carries verified_on_hardware false, so that a figure from code
# tested only off the device is never quoted as a measured GPU or Jetson figure.
HARDWARE_RUNS: dict[str, str | None] = {
    "encoder onnxruntime-cuda": None, "encoder onnxruntime-tensorrt": None, "encoder tensorrt": None,
    "encoder jetson": None, "decoder onnxruntime-cuda": None, "decoder onnxruntime-tensorrt": None,
    "decoder jetson": None,
}


def hardware_label(path: str) -> dict:
    """``verified_on_hardware`` and a sentence for one path ("decoder onnxruntime-cuda", "encoder jetson")."""
    ran = HARDWARE_RUNS.get(path)
    note = (f"edgekit's {path} path has run on {ran}" if ran else
            f"edgekit's {path} path has not yet run on real hardware (its code is tested off the device only): "
            "treat these figures as unconfirmed")
    return {"verified_on_hardware": ran is not None, "hardware_note": note}


def session_device_report(session, model: str = "encoder") -> dict:
    """Called in the worker at the end: the session's own figures, NVML's view of this process, and whether
    this path has run on hardware (``model``: encoder or decoder)."""
    report = hardware_label(f"{model} {session.name}")
    info = getattr(session, "device_info", None)
    if callable(info):
        try:
            report.update(info())
        except Exception as exc:  # a figure we cannot read must not lose the timings
            report["device_info_error"] = f"{type(exc).__name__}: {exc}"
    mem = process_gpu_memory()
    report["gpu_memory_bytes"], report["gpu_memory_note"] = mem["bytes"], mem["note"]
    return report


def phase_stats(phases: list[dict]) -> dict:
    """p50/p90/p99/mean per phase (ms) from the per-run dicts of ``timed_run``."""
    out = {}
    for key in ("h2d_ms", "compute_ms", "d2h_ms"):
        values = np.asarray([p[key] for p in phases if key in p], dtype=np.float64)
        if values.size:
            p50, p90, p99 = np.percentile(values, [50, 90, 99])
            out[key] = {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(values.mean())}
    return out


def device_metrics(phases: list[dict], end: dict) -> dict:
    """The per-variant device block of the bench report."""
    metrics = {"phases": phase_stats(phases), "runs_with_phases": len(phases)}
    keep = ("timing", "activation_bytes", "engine_bytes", "cuda_memory_used_bytes", "providers", "engine_warnings",
            "gpu_memory_bytes", "gpu_memory_note", "device_info_error", "nodes_by_provider", "cpu_nodes", "nodes",
            "verified_on_hardware", "hardware_note")
    metrics.update({k: end[k] for k in keep if k in end})
    return metrics


GPU_METHOD = ("GPU phases: host-to-device copy, compute and device-to-host copy timed apart (CUDA events on the "
              "engine's stream for TensorRT; host timers around synchronous IOBinding calls for onnxruntime); "
              "GPU memory per process from NVML where the driver exposes it")
