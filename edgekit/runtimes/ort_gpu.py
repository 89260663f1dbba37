"""onnxruntime on NVIDIA GPUs: the CUDA and TensorRT execution providers (the 'gpu' extra: onnxruntime-gpu).

``--device cuda`` runs on CUDAExecutionProvider; ``--device tensorrt`` on TensorrtExecutionProvider, with
onnxruntime handing the nodes TensorRT cannot take to CUDA, then to the CPU. A provider that is missing,
or that onnxruntime silently drops at session creation (its CUDA/cuDNN libraries did not load), is an
error here: measuring the CPU fallback under a GPU label is exactly the silent failure to avoid.

Q/DQ (INT8) models need no TensorRT precision flag: with neither trt_fp16_enable nor trt_int8_enable,
onnxruntime builds a strongly typed TensorRT network (onnxruntime#24298), which follows the Q/DQ scales.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.runtimes.base import Session

# Here rather than in ort_runtime (which imports this module): both the CPU and the GPU sessions use it.
_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32", "tensor(bool)": "bool"}


def input_dtypes(sess) -> dict:
    import numpy as np

    return {i.name: np.dtype(_ORT_DTYPES[i.type]) for i in sess.get_inputs() if i.type in _ORT_DTYPES}


GPU_PROVIDERS = {
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
GPU_HINT = ("install the GPU build of onnxruntime: pip uninstall -y onnxruntime && pip install 'edgekit[gpu]' "
            "(onnxruntime-gpu; on a Jetson, the wheel built for your JetPack, listed in the Jetson Zoo)")


def ort_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "ort-tensorrt"


def tensorrt_provider_options(fp16: bool = False, cache_dir: str | os.PathLike | None = None,
                              workspace_bytes: int | None = None) -> dict:
    """TensorrtExecutionProvider options: engine and timing caches on (first load builds, later loads reuse)."""
    cache = str(cache_dir or ort_cache_dir())
    opts = {"device_id": 0, "trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache, "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
    if workspace_bytes:
        opts["trt_max_workspace_size"] = int(workspace_bytes)
    return opts


def gpu_providers(device: str, available: list[str], options: dict | None = None) -> list:
    """The providers list for ``device``; EdgekitError naming the extra when onnxruntime lacks the provider."""
    wanted = GPU_PROVIDERS[device][0]
    if wanted not in available:
        raise EdgekitError(f"the installed onnxruntime has no {wanted} (it offers {', '.join(available)}), so "
                           f"it cannot run on '{device}'", GPU_HINT)
    if device == "tensorrt":
        if options is None:
            ort_cache_dir().mkdir(parents=True, exist_ok=True)
            options = tensorrt_provider_options()
        return [("TensorrtExecutionProvider", options), *GPU_PROVIDERS["tensorrt"][1:]]
    return list(GPU_PROVIDERS[device])


def check_active(device: str, active: list[str]) -> None:
    wanted = GPU_PROVIDERS[device][0]
    if wanted not in active:
        raise EdgekitError(f"onnxruntime could not start {wanted} and fell back to {', '.join(active)}",
                           "check that the CUDA, cuDNN (and TensorRT) versions installed match the ones your "
                           "onnxruntime-gpu release was built for (onnxruntime's install table), then run again")


class OrtGpuSession(Session):
    """onnxruntime on a GPU provider; ``timed_run`` splits H2D / compute / D2H with IOBinding."""

    def _run(self, inputs):
        return self.info["session"].run([self.output_name], inputs)[0]

    def timed_run(self, inputs: dict) -> dict:
        return self.timed_run_prepared(self.prepare(inputs))

    def timed_run_prepared(self, prepared: dict) -> dict:
        """Run once on what ``prepare`` returned; {'h2d_ms', 'compute_ms', 'd2h_ms'}."""
        # onnxruntime exposes no CUDA events to Python: each phase is a synchronous call timed on the host
        # (OrtValue creation copies and waits; Run synchronizes its stream at the end by default).
        import onnxruntime as ort

        sess = self.info["session"]
        t0 = time.perf_counter_ns()
        binding = sess.io_binding()
        for name in self.input_names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(prepared[name], "cuda", 0))
        binding.bind_output(self.output_name, "cuda", 0)
        t1 = time.perf_counter_ns()
        sess.run_with_iobinding(binding)
        t2 = time.perf_counter_ns()
        binding.copy_outputs_to_cpu()
        t3 = time.perf_counter_ns()
        return {"h2d_ms": (t1 - t0) / 1e6, "compute_ms": (t2 - t1) / 1e6, "d2h_ms": (t3 - t2) / 1e6}

    def device_info(self) -> dict:
        return {"timing": "host timers around synchronous onnxruntime calls (IOBinding)",
                "providers": self.info["session"].get_providers()}


def gpu_session(sess, path, task, input_names, device, threads) -> OrtGpuSession:
    check_active(device, sess.get_providers())
    return OrtGpuSession(f"onnxruntime-{device}", path, task.name, input_names, task.output, device, threads,
                         {"session": sess, "dtypes": input_dtypes(sess)})
