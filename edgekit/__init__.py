"""edgekit: fine-tuned Hugging Face encoders -> pruned, INT8, ONNX/TensorRT, verified and benchmarked.

``import edgekit`` stays light: the public functions are resolved lazily from ``edgekit.api`` so that
torch, onnxruntime and optimum are imported only when a stage actually runs.
"""

from __future__ import annotations

from edgekit.version import __version__

# ``compress`` and ``verify`` are also the names of the subpackage edgekit.compress and the module
# edgekit.verify, so those two functions are reached as ``edgekit.api.compress`` and ``edgekit.api.verify``;
# the other stages are available here too.
_API = ("export", "prune", "quantize", "bench", "demo", "load_runtime")


def __getattr__(name: str):
    if name in _API:
        from edgekit import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
