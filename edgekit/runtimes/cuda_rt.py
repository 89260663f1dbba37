"""The few CUDA runtime calls edgekit needs (buffers, a stream, events, device facts), via cuda-python.

Why cuda-python and not torch.cuda: edgekit installs the CPU build of torch (a CUDA torch is a multi-GB
download on x86, and on a Jetson it needs NVIDIA's own wheels), while cuda-python is a small package that
binds the CUDA runtime already on the machine, is what NVIDIA's TensorRT samples use, and has aarch64
wheels. Imported lazily: nothing here runs until a GPU session is loaded.

cuda-python 12.6+ spells the module ``cuda.bindings.runtime``; older releases ``cuda.cudart`` (removed in 13).
Every call returns ``(error, *values)``; ``call`` turns an error into an exception.

cuda-bindings N links CUDA runtime N: 13.x needs a driver for CUDA 13 (580+), so on JetPack 6 (CUDA 12.6) it
fails every call with cudaErrorInsufficientDriver. The extras pin the major (``gpu``, ``tensorrt``, ``jetson``:
CUDA 12; ``tensorrt-cuda13``, ``jetson-thor``: CUDA 13), and ``call`` tells "no driver" (the driver reports
CUDA 0) apart from "a driver older than these bindings" (it reports a lower CUDA version than the runtime).
"""

from __future__ import annotations

import ctypes
import functools

from edgekit.errors import EdgekitError, MissingExtra

# Errors that mean "there is no usable GPU here", as opposed to a bug or a full GPU.
_NO_GPU = ("cudaErrorNoDevice", "cudaErrorInsufficientDriver", "cudaErrorDevicesUnavailable",
           "cudaErrorSystemDriverMismatch", "cudaErrorCompatNotSupportedOnDevice")


@functools.cache  # called around every CUDA call of the timed loop; a failed import is not cached
def cudart():
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6
        except ImportError as exc:
            raise MissingExtra("cuda-python", "tensorrt") from exc
    return runtime


def call(result):
    """Unpack ``(err, *values)``; raise on an error (EdgekitError when the machine has no usable GPU)."""
    rt = cudart()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        if name == "cudaErrorInsufficientDriver":
            raise insufficient_driver_error(rt)
        if name in _NO_GPU:
            raise EdgekitError(f"no usable NVIDIA GPU here ({name})",
                               "run on a machine with an NVIDIA GPU and its driver, or use --device cpu")
        raise RuntimeError(f"CUDA call failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def _bindings_version() -> str:
    from importlib import metadata

    for dist in ("cuda-bindings", "cuda-python"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "?"


def insufficient_driver_error(rt) -> EdgekitError:
    """cudaErrorInsufficientDriver has two causes: no driver at all, or bindings newer than the driver."""
    driver_err, driver = rt.cudaDriverGetVersion()
    runtime_err, runtime = rt.cudaRuntimeGetVersion()
    if driver_err != rt.cudaError_t.cudaSuccess or not driver:
        return EdgekitError("no usable NVIDIA GPU here (no NVIDIA driver is loaded: cudaErrorInsufficientDriver)",
                            "run on a machine with an NVIDIA GPU and its driver, or use --device cpu")
    major = driver // 1000
    return EdgekitError(
        f"cuda-bindings {_bindings_version()} is built for CUDA runtime {_version(runtime)}, but this machine's "
        f"driver supports CUDA {_version(driver)} only (cudaErrorInsufficientDriver)",
        f"install the bindings for the driver's CUDA: pip install 'cuda-python>={major},<{major + 1}' "
        f"(edgekit's extras pin it: [gpu], [tensorrt] and [jetson] for CUDA 12; [tensorrt-cuda13] and "
        f"[jetson-thor] for CUDA 13), or update the driver")


def native_handle(obj) -> int:
    """The address of a CUDA object (a stream) for TensorRT: ``int(obj)`` is deprecated from cuda-bindings
    12.9.1/13.0 in favour of ``cuda.bindings.utils.get_cuda_native_handle``, which older releases lack."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def device_facts(device: int = 0) -> dict:
    """Name, compute capability, CUDA runtime/driver versions of one GPU (raises when there is none)."""
    rt = cudart()
    prop = call(rt.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "gpu_name": name.rstrip("\x00").strip(),
        "compute_capability": f"{prop.major}.{prop.minor}",
        "gpu_memory_bytes": int(prop.totalGlobalMem),
        "integrated": bool(prop.integrated),  # True on Jetson: CPU and GPU share one RAM
        "cuda_runtime": _version(call(rt.cudaRuntimeGetVersion())),
        "cuda_driver": _version(call(rt.cudaDriverGetVersion())),
    }


def format_uuid(raw) -> str:
    """NVML's spelling of a GPU UUID ("GPU-8hex-4-4-4-12") from CUDA's 16 bytes (cudaUUID_t.bytes)."""
    h = bytes(raw).hex() if not isinstance(raw, str) else raw.lower().removeprefix("gpu-").replace("-", "")
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def device_uuid(device: int = 0) -> str | None:
    """The UUID of CUDA device ``device`` of this process, or None without cuda-python or a GPU."""
    try:
        rt = cudart()
        err, prop = rt.cudaGetDeviceProperties(device)
    except Exception:  # cuda-python absent or broken: the caller falls back and says how it matched
        return None
    if err != rt.cudaError_t.cudaSuccess:
        return None
    raw = prop.uuid.bytes
    return format_uuid(raw.encode("latin-1") if isinstance(raw, str) else raw)


def memory_used_bytes() -> int | None:
    """Device memory in use on the current GPU (all processes), from cudaMemGetInfo."""
    free, total = call(cudart().cudaMemGetInfo())
    return int(total) - int(free)


class Buffer:
    """A device buffer and a page-locked host buffer of the same size, grown on demand (never shrunk)."""

    def __init__(self):
        self.nbytes = 0
        self.device = 0
        self.host = 0

    def ensure(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        self.free()
        rt = cudart()
        self.device = int(call(rt.cudaMalloc(nbytes)))
        # Page-locked host memory: copies from pageable memory are staged and synchronous, which would
        # blur the H2D/D2H figures.
        self.host = int(call(rt.cudaMallocHost(nbytes)))
        self.nbytes = nbytes

    def host_view(self, nbytes: int):
        import numpy as np

        return np.ctypeslib.as_array(ctypes.cast(self.host, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))

    def free(self) -> None:
        rt = cudart() if self.nbytes else None
        if rt is not None:
            call(rt.cudaFree(self.device))
            call(rt.cudaFreeHost(self.host))
        self.nbytes, self.device, self.host = 0, 0, 0


class StreamTimer:
    """One CUDA stream and four events: before H2D, after H2D, after compute, after D2H."""

    def __init__(self):
        rt = cudart()
        self.rt = rt
        self.stream = call(rt.cudaStreamCreate())
        self.events = [call(rt.cudaEventCreate()) for _ in range(4)]

    @property
    def handle(self) -> int:
        return native_handle(self.stream)

    def mark(self, i: int) -> None:
        call(self.rt.cudaEventRecord(self.events[i], self.stream))

    def copy(self, dst: int, src: int, nbytes: int, to_device: bool) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice if to_device else self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        call(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, self.stream))

    def finish(self) -> dict:
        """Wait for the last event; the three phases in milliseconds (CUDA events, ~0.5 us resolution)."""
        call(self.rt.cudaEventSynchronize(self.events[3]))
        e = self.events
        ms = [float(call(self.rt.cudaEventElapsedTime(e[i], e[i + 1]))) for i in range(3)]
        return {"h2d_ms": ms[0], "compute_ms": ms[1], "d2h_ms": ms[2]}

    def close(self) -> None:
        for e in self.events:
            call(self.rt.cudaEventDestroy(e))
        call(self.rt.cudaStreamDestroy(self.stream))
        self.events = []
