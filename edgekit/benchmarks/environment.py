"""The machine a figure was measured on, recorded beside every figure."""

from __future__ import annotations

import os
import platform
from importlib import metadata

ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve")
LIBRARIES = ("edgekit", "torch", "onnxruntime", "onnx", "transformers", "optimum", "optimum-onnx", "numpy")


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware") and value.strip():
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags.update(value.split())
    except OSError:
        pass
    return model, [f for f in ISA_FLAGS if f in flags]


def library_versions() -> dict[str, str | None]:
    from edgekit.version import __version__

    # edgekit's own version from the package, not its distribution's metadata: the distribution is named
    # edgekit-transformers (the PyPI name 'edgekit' is another project), and an unpackaged checkout has none.
    out = {"edgekit": __version__}
    for name in LIBRARIES[1:]:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment(threads: int | None = None) -> dict:
    model, flags = _cpuinfo()
    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is a dependency, but the environment block must never break a run
        physical = None
    affinity = usable_cores()
    return {
        "device": "cpu",
        "cpu_model": model,
        "isa_flags": flags,
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "usable_cores": affinity,
        "threads": threads,
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "libraries": library_versions(),
    }


# The keys of an environment block that must match for two latencies to be compared.
COMPARED_KEYS = ("device", "cpu_model", "isa_flags", "logical_cores", "threads", "machine", "libraries")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; every core where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def comparable(a: dict, b: dict) -> bool:
    """Two environment blocks describe the same measuring conditions (latency can be compared)."""
    return all(a.get(k) == b.get(k) for k in COMPARED_KEYS)
