"""One Runtime interface: ``load(artifact, device) -> Session``; ``Session.run(inputs) -> outputs``.

``run`` is ``prepare`` then ``run_prepared``, as Polygraphy's runners split it: ``prepare`` does the host-side
work (the model's inputs only, its dtypes, contiguous arrays, torch tensors) and ``run_prepared`` is only
the backend's call, so that a benchmark can time exactly that.

Verify and bench both go through it, so the accuracy that is confirmed is the accuracy of the runtime that
ships. Backends are registered by name and imported lazily, so a missing optional package (CUDA,
TensorRT) only matters to the user who asks for it.
"""

from __future__ import annotations

import abc
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError

ARTIFACT_FILE = "edgekit.json"  # metadata every edgekit ONNX artifact carries (stage, task, source)
ONNX_NAME = "model.onnx"


@dataclass
class Session(abc.ABC):
    """A loaded model. Subclasses implement ``_run`` (the backend's call) and may override ``prepare``."""

    name: str  # e.g. "torch-fp32", "onnxruntime"
    path: Path
    task: str
    input_names: list[str]
    output_name: str
    device: str = "cpu"
    threads: int | None = None
    info: dict = field(default_factory=dict)

    def run(self, inputs: dict) -> "object":
        """Run one batch of int64 numpy inputs; return the task's output as a float32 numpy array."""
        return self.run_prepared(self.prepare(inputs))

    def prepare(self, inputs: dict) -> dict:
        """Everything before the backend's call, done once per batch and never timed: the model's inputs only,
        as C-contiguous arrays of the dtype it takes (``info["dtypes"]``, name -> numpy dtype, where known)."""
        import numpy as np

        dtypes = self.info.get("dtypes") or {}
        return {k: np.ascontiguousarray(v, dtype=dtypes.get(k)) for k, v in inputs.items() if k in self.input_names}

    def run_prepared(self, prepared) -> "object":
        """Only the backend's call, on what ``prepare`` returned: the region a benchmark times."""
        return self._run(prepared)

    @abc.abstractmethod
    def _run(self, inputs):
        """The runtime's own call, on exactly the model's inputs as ``prepare`` returned them."""

    def close(self) -> None:
        pass


# runtime name -> "module:function" that loads an artifact for it; imported only when used.
RUNTIMES = {
    "torch": "edgekit.runtimes.torch_runtime:load_torch",
    "onnxruntime": "edgekit.runtimes.ort_runtime:load_onnxruntime",
    "tensorrt": "edgekit.runtimes.tensorrt:load_tensorrt",
}


def artifact_kind(path: Path) -> str:
    """'checkpoint', 'onnx' or 'engine', from what the folder (or file) holds."""
    if (path.is_file() and path.suffix == ".engine") or (path.is_dir() and (path / "model.engine").is_file()):
        return "engine"  # a TensorRT engine (edgekit engine build), run by the tensorrt runtime

    if path.is_file():
        if path.suffix == ".onnx":
            return "onnx"
        raise EdgekitError(f"{path} is neither a checkpoint folder nor an .onnx file", "point at a model folder")
    if (path / ONNX_NAME).is_file():
        return "onnx"
    if (path / "config.json").is_file():
        return "checkpoint"
    if list(path.glob("*.onnx")):
        return "onnx"
    raise EdgekitError(
        f"{path} holds neither a Hugging Face checkpoint (config.json) nor an ONNX model ({ONNX_NAME})",
        "point at a checkpoint folder or at an edgekit export/quantize output",
    )


def onnx_file(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / ONNX_NAME).is_file():
        return path / ONNX_NAME
    found = sorted(path.glob("*.onnx"))
    if len(found) != 1:
        raise EdgekitError(f"{path} holds {len(found)} .onnx files", "point at one .onnx file")
    return found[0]


def read_artifact_meta(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    meta = folder / ARTIFACT_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load(artifact, device: str = "cpu", threads: int | None = None, task: str | None = None,
         runtime: str | None = None) -> Session:
    """Load a checkpoint (torch) or an ONNX artifact (onnxruntime) behind the same interface.

    ``artifact`` is a path, or an opened ``edgekit.checkpoint.Checkpoint`` (run on torch without reopening it).
    """
    from edgekit.checkpoint import Checkpoint, require_path

    if isinstance(artifact, Checkpoint) and runtime in (None, "torch"):
        runtime, path = "torch", artifact  # the torch runtime takes the opened checkpoint as it is
    else:
        path = require_path(artifact.path if isinstance(artifact, Checkpoint) else artifact, "model")
    if runtime is None:
        runtime = {"checkpoint": "torch", "engine": "tensorrt"}.get(artifact_kind(path), "onnxruntime")
    if runtime not in RUNTIMES:
        raise EdgekitError(f"unknown runtime '{runtime}'", f"use one of: {', '.join(RUNTIMES)}")
    module, func = RUNTIMES[runtime].split(":")
    return getattr(importlib.import_module(module), func)(path, device=device, threads=threads, task=task)
