"""onnxruntime on NVIDIA GPUs: the CUDA and TensorRT execution providers (the 'gpu' extra: onnxruntime-gpu).

``--device cuda`` runs on CUDAExecutionProvider; ``--device tensorrt`` on TensorrtExecutionProvider, with
onnxruntime handing the nodes TensorRT cannot take to CUDA, then to the CPU. A provider that is missing,
or that onnxruntime silently drops at session creation (its CUDA/cuDNN libraries did not load), is an
error here: measuring the CPU fallback under a GPU label is exactly the silent failure to avoid.

Q/DQ (INT8) models get ``trt_int8_enable`` with no calibration table: onnxruntime's TensorRT provider
documentation asks for exactly that for explicitly quantized models (the Q/DQ nodes carry the scales), and
without it TensorRT refuses them ("int8 is not configured in the builder", onnxruntime#13381).

The engine is built once per session for one optimization profile (``trt_profile_*_shapes``) that covers
every shape the caller will feed, and cached (``trt_engine_cache_enable``): without explicit shapes
onnxruntime rebuilds the engine whenever an input falls outside the shapes it has seen, inside whatever is
being timed. ``TensorrtDevice`` carries the profile and the FP16 choice from bench to its worker process.
"""

from __future__ import annotations

import importlib
import os
import statistics
import time
from contextlib import contextmanager
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
GPU_HINT = ("install the GPU build of onnxruntime alone: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
            "'edgekit-transformers[gpu]' (on a Jetson, the onnxruntime-gpu wheel built for your JetPack, from the "
            "Jetson Zoo)")

# The builds of onnxruntime on PyPI: each installs the same 'onnxruntime' package folder, so two of them
# overwrite each other's files and whichever was installed last decides which providers exist, or breaks both.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-qnn", "onnxruntime-training")


def ort_distributions() -> list[str]:
    from importlib import metadata

    names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
    return [n for n in ORT_DISTRIBUTIONS if n in names]


def require_onnxruntime() -> None:
    """Exactly one onnxruntime build installed, or one sentence saying how to get there."""
    found = ort_distributions()
    if len(found) > 1:
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else found[-1]
        raise EdgekitError(
            f"{' and '.join(found)} are both installed, and they overwrite each other's files (onnxruntime#7748)",
            f"keep one: pip uninstall -y {' '.join(found)} && pip install {keep} (on a Jetson, the Jetson Zoo "
            "wheel for your JetPack instead)")
    if not found:
        try:
            import onnxruntime  # noqa: F401  (a build from source, or a wheel without metadata)
        except ImportError:
            raise EdgekitError("onnxruntime is not installed (edgekit needs one build of it)",
                               "pip install 'edgekit-transformers[cpu]', or 'edgekit-transformers[gpu]' on an "
                               "NVIDIA GPU (on a Jetson, "
                               "the Jetson Zoo's onnxruntime-gpu wheel)") from None


def ort_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "ort-tensorrt"


# Where no caller says what it feeds (verify, a plain load): verify's default batch (32) and max_length (128).
DEFAULT_TRT_BATCH, DEFAULT_TRT_SEQ = (1, 1, 32), (1, 128, 128)


class TensorrtDevice(str):
    """The device name "tensorrt", carrying the TensorRT provider's settings into a worker process.

    It compares, prints and serialises as "tensorrt" (every check on a device name is unchanged); ``batch`` and
    ``seq`` are the (min, opt, max) of the profile, ``fp16`` is trt_fp16_enable.
    """

    def __new__(cls, batch: tuple = DEFAULT_TRT_BATCH, seq: tuple = DEFAULT_TRT_SEQ, fp16: bool = False):
        self = super().__new__(cls, "tensorrt")
        self.batch, self.seq, self.fp16 = tuple(int(x) for x in batch), tuple(int(x) for x in seq), bool(fp16)
        return self

    def __reduce__(self):  # through the spawn pipe as itself, not as a plain str
        return (TensorrtDevice, (self.batch, self.seq, self.fp16))

    def settings(self) -> dict:
        """The report's environment block: what the provider was built with."""
        return {"fp16": self.fp16, "batch": list(self.batch), "seq": list(self.seq)}

    def method_note(self) -> str:
        return (f"onnxruntime TensorRT provider with FP16 {'on' if self.fp16 else 'off'}, one profile of batch "
                f"{self.batch} x sequence {self.seq} (min, opt, max) covering every input, engine cached")


def tensorrt_device_for(batches: list[dict], fp16: bool = False) -> TensorrtDevice:
    """The profile covering every batch: min and max of the batch sizes and lengths, the most common batch
    size and the median length as opt (TensorRT tunes its kernels for opt)."""
    sizes = [int(b["input_ids"].shape[0]) for b in batches]
    lengths = [int(b["input_ids"].shape[1]) for b in batches]
    opt_batch = max(set(sizes), key=lambda n: (sizes.count(n), n))
    opt_seq = min(max(int(round(statistics.median(lengths))), min(lengths)), max(lengths))
    return TensorrtDevice((min(sizes), opt_batch, max(sizes)), (min(lengths), opt_seq, max(lengths)), fp16)


def profile_shapes(inputs: dict, batch: tuple, seq: tuple) -> dict:
    """trt_profile_{min,opt,max}_shapes in onnxruntime's syntax: "input_ids:1x1,attention_mask:1x1".

    ``inputs``: name -> its two dims; a fixed dim (an int) stays as the model has it in all three."""
    def dim(d, triple, i):
        return d if isinstance(d, int) and d > 0 else triple[i]

    return {f"trt_profile_{k}_shapes": ",".join(f"{n}:{dim(b, batch, i)}x{dim(s, seq, i)}"
                                                for n, (b, s) in inputs.items())
            for i, k in enumerate(("min", "opt", "max"))}


def tensorrt_provider_options(fp16: bool = False, cache_dir: str | os.PathLike | None = None,
                              workspace_bytes: int | None = None, int8: bool = False,
                              profile: dict | None = None) -> dict:
    """TensorrtExecutionProvider options: engine and timing caches on (first load builds, later loads reuse).

    ``int8``: the model is Q/DQ (explicit quantization: no calibration table); ``profile``: from profile_shapes.
    """
    cache = str(cache_dir or ort_cache_dir())
    opts = {"device_id": 0, "trt_fp16_enable": bool(fp16), "trt_engine_cache_enable": True,
            "trt_engine_cache_path": cache, "trt_timing_cache_enable": True, "trt_timing_cache_path": cache}
    if int8:
        opts.update({"trt_int8_enable": True, "trt_int8_use_native_calibration_table": False})
    if workspace_bytes:
        opts["trt_max_workspace_size"] = int(workspace_bytes)
    opts.update(profile or {})
    return opts


def model_tensorrt_options(model, device: str) -> dict:
    """The provider options for one ONNX file: its [batch, sequence] inputs in the profile, int8 if Q/DQ."""
    from edgekit.runtimes.base import onnx_file
    from edgekit.runtimes.tensorrt import read_onnx_summary

    dev = device if isinstance(device, TensorrtDevice) else TensorrtDevice()
    summary = read_onnx_summary(onnx_file(Path(model)))
    inputs = {i.name: i.shape for i in summary.inputs if len(i.shape) == 2}  # [batch, sequence]
    return tensorrt_provider_options(fp16=dev.fp16, int8=summary.has_qdq,
                                     profile=profile_shapes(inputs, dev.batch, dev.seq) if inputs else None)


def preload_tensorrt() -> bool:
    """Import the pip/JetPack ``tensorrt`` package when there is one: that loads libnvinfer from its folder
    (tensorrt_libs), which onnxruntime does not search by itself (onnxruntime#18597). True when it loaded."""
    try:
        importlib.import_module("tensorrt")
    except Exception:  # absent, or present but its libraries do not load: the fallback check says so
        return False
    return True


def gpu_providers(device: str, available: list[str], options: dict | None = None, model=None) -> list:
    """The providers list for ``device``; EdgekitError naming the extra when onnxruntime lacks the provider.

    ``model``: the ONNX file, read for the TensorRT profile's input names and its Q/DQ nodes."""
    wanted = GPU_PROVIDERS[device][0]
    if wanted not in available:
        raise EdgekitError(f"the installed onnxruntime has no {wanted} (it offers {', '.join(available)}), so "
                           f"it cannot run on '{device}'", GPU_HINT)
    if device == "tensorrt":
        preload_tensorrt()
        ort_cache_dir().mkdir(parents=True, exist_ok=True)  # the engine cache the provider options name
        if options is None:
            options = model_tensorrt_options(model, device) if model is not None else tensorrt_provider_options(
                fp16=getattr(device, "fp16", False))
        return [("TensorrtExecutionProvider", options), *GPU_PROVIDERS["tensorrt"][1:]]
    return list(GPU_PROVIDERS[device])


LIBNVINFER_HINT = ("onnxruntime did not find TensorRT's libnvinfer.so.10 (onnxruntime#18597): pip install tensorrt "
                   "(on a Jetson, JetPack's TensorRT), or add the folder holding libnvinfer.so.10 to LD_LIBRARY_PATH")
VERSION_HINT = ("check that the CUDA, cuDNN (and TensorRT) versions installed match the ones your "
                "onnxruntime-gpu release was built for (onnxruntime's install table), then run again")


def check_active(device: str, active: list[str]) -> None:
    wanted = GPU_PROVIDERS[device][0]
    if wanted not in active:
        # TensorRT dropped but CUDA up: CUDA/cuDNN loaded, so libnvinfer is what is missing, unless the
        # tensorrt package imports (its libnvinfer loaded) and then its version is the suspect.
        trt_missing = device == "tensorrt" and "CUDAExecutionProvider" in active and not preload_tensorrt()
        raise EdgekitError(f"onnxruntime could not start {wanted} and fell back to {', '.join(active)}",
                           LIBNVINFER_HINT if trt_missing else VERSION_HINT)


def profiling_options(so, folder: str | os.PathLike | None = None):
    """Turn on onnxruntime's profiler for the one placement run (``node_placement`` turns it off again and
    deletes the trace, whose name onnxruntime makes unique by appending a timestamp)."""
    import tempfile

    so.enable_profiling = True
    so.profile_file_prefix = str(Path(folder or tempfile.gettempdir()) / f"edgekit-placement-{os.getpid()}")
    return so


def discard_profile(sess) -> None:
    """End the profiler of a session that fails before its placement run and delete the trace: onnxruntime
    writes one for a profiled session when it is dropped, so each refusal (a provider that fell back, a graph
    that is not the one asked for) would otherwise leave an ``edgekit-placement-*.json`` in the temp folder."""
    trace = sess.end_profiling()
    if trace:
        Path(trace).unlink(missing_ok=True)


@contextmanager
def profile_discarded_on_error(sess):
    """Everything from a profiled session's creation to the end of its placement run (checks, the run itself);
    on any error, discard_profile. Each creator of a GPU session wraps that span once (ort_runtime's
    load_onnxruntime, decoder's OrtDecoder); a second end_profiling after a successful placement run is a no-op."""
    try:
        yield sess
    except BaseException:
        discard_profile(sess)
        raise


def placement_inputs(sess, batch: int = 1, seq: int = 8) -> dict:
    """Inputs of one valid shape for the placement run: ids 0, mask 1 ([batch, seq] for 2-D int inputs)."""
    import numpy as np

    dtypes = input_dtypes(sess)
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else (batch if n == 0 else seq) for n, d in enumerate(i.shape)]
        fill = 1 if "mask" in i.name else 0
        feeds[i.name] = np.full(shape, fill, dtype=dtypes.get(i.name, np.dtype("int64")))
    return feeds


def node_placement(sess, inputs: dict) -> dict:
    """Which execution provider ran each node: one profiled run, then the profiler is switched off.

    ``get_providers()`` lists the providers registered, not where the nodes went: onnxruntime hands any node
    a GPU provider cannot take to the CPU without a word. Its profiler records, for every node it runs, the
    provider that ran it (``args.provider`` of the "Node" events), which is the placement of the optimised
    graph that is actually timed. ``end_profiling`` stops the profiler, so the timed runs are not profiled.
    """
    import json

    sess.run(None, inputs)  # on error the session's owner discards the profile (profile_discarded_on_error)
    trace = sess.end_profiling()
    by_provider: dict[str, set] = {}
    try:
        events = json.loads(Path(trace).read_text()) if trace else []
    finally:
        if trace:
            Path(trace).unlink(missing_ok=True)
    for event in events:
        name, args = event.get("name", ""), event.get("args") or {}
        if event.get("cat") == "Node" and name.endswith("_kernel_time") and args.get("provider"):
            by_provider.setdefault(args["provider"], set()).add(name[: -len("_kernel_time")])
    counts = {provider: len(nodes) for provider, nodes in sorted(by_provider.items())}
    return {"nodes_by_provider": counts, "cpu_nodes": counts.get("CPUExecutionProvider", 0),
            "nodes": sum(counts.values())}


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
        memory = self.info.get("memory_device", "cuda")  # "cpu": the same phases on a CPU session (tests)
        t0 = time.perf_counter_ns()
        binding = sess.io_binding()
        for name in self.input_names:
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(prepared[name], memory, 0))
        binding.bind_output(self.output_name, memory, 0)
        t1 = time.perf_counter_ns()
        sess.run_with_iobinding(binding)
        t2 = time.perf_counter_ns()
        binding.copy_outputs_to_cpu()
        t3 = time.perf_counter_ns()
        return {"h2d_ms": (t1 - t0) / 1e6, "compute_ms": (t2 - t1) / 1e6, "d2h_ms": (t3 - t2) / 1e6}

    def device_info(self) -> dict:
        return {"timing": "host timers around synchronous onnxruntime calls (IOBinding)",
                "providers": self.info["session"].get_providers(), **self.info.get("placement", {})}


def gpu_session(sess, path, task, input_names, device, threads) -> OrtGpuSession:
    """The GPU session, after checking the provider started and counting the nodes it left to the CPU.

    ``sess`` was created with ``profiling_options``: the placement run is also the engine build for the
    TensorRT provider (at the profile's smallest shape), so it happens here, before anything is timed."""
    check_active(device, sess.get_providers())
    if isinstance(device, TensorrtDevice):
        batch, seq = device.batch[0], device.seq[0]
    else:
        batch, seq = DEFAULT_TRT_BATCH[0], 8
    placement = node_placement(sess, placement_inputs(sess, batch, seq))
    return OrtGpuSession(f"onnxruntime-{device}", path, task.name, input_names, task.output, device, threads,
                         {"session": sess, "dtypes": input_dtypes(sess), "placement": placement})
