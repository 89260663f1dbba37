"""One Runtime interface: ``load(artifact, device) -> Session``; ``Session.run(inputs) -> outputs``.

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
    """A loaded model. Subclasses implement ``_run``; ``run`` filters inputs to what the model takes."""

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
        return self._run({k: v for k, v in inputs.items() if k in self.input_names})

    @abc.abstractmethod
    def _run(self, inputs: dict):
        """The runtime's own call, on exactly the model's inputs."""

    def close(self) -> None:
        pass


# runtime name -> "module:function" that loads an artifact for it; imported only when used.
RUNTIMES = {
    "torch": "edgekit.runtimes.torch_runtime:load_torch",
    "onnxruntime": "edgekit.runtimes.ort_runtime:load_onnxruntime",
    "tensorrt": "edgekit.runtimes.tensorrt:load_tensorrt",
}


def artifact_kind(path: Path) -> str:
    """'checkpoint' or 'onnx', from what the folder (or file) holds."""
    from edgekit.checkpoint import is_checkpoint

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
    if is_checkpoint(path):
        return "checkpoint"
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
    """Load a checkpoint (torch) or an ONNX artifact (onnxruntime) behind the same interface."""
    from edgekit.checkpoint import require_path

    path = require_path(artifact, "model")
    if runtime is None:
        runtime = {"checkpoint": "torch", "engine": "tensorrt"}.get(artifact_kind(path), "onnxruntime")
    if runtime not in RUNTIMES:
        raise EdgekitError(f"unknown runtime '{runtime}'", f"use one of: {', '.join(RUNTIMES)}")
    module, func = RUNTIMES[runtime].split(":")
    return getattr(importlib.import_module(module), func)(path, device=device, threads=threads, task=task)
