"""The few CUDA runtime calls edgekit needs (buffers, a stream, events, device facts), via cuda-python.

Why cuda-python and not torch.cuda: edgekit installs the CPU build of torch (a CUDA torch is a multi-GB
download on x86, and on a Jetson it needs NVIDIA's own wheels), while cuda-python is a small package that
binds the CUDA runtime already on the machine, is what NVIDIA's TensorRT samples use, and has aarch64
wheels. Imported lazily: nothing here runs until a GPU session is loaded.

cuda-python 12.6+ spells the module ``cuda.bindings.runtime``; older releases ``cuda.cudart`` (removed in 13).
Every call returns ``(error, *values)``; ``call`` turns an error into an exception.
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
        if name in _NO_GPU:
            raise EdgekitError(f"no usable NVIDIA GPU here ({name})",
                               "run on a machine with an NVIDIA GPU and its driver, or use --device cpu")
        raise RuntimeError(f"CUDA call failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


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
        return int(self.stream)

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
