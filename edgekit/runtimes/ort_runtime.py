"""onnxruntime on the CPU (CUDA/TensorRT execution providers arrive with the gpu extra)."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.runtimes.base import Session, onnx_file, read_artifact_meta
from edgekit.runtimes.ort_gpu import GPU_PROVIDERS, gpu_providers, input_dtypes
from edgekit.tasks import TASKS, detect_task

# GPU devices (onnxruntime-gpu): the provider lists with options come from ort_gpu.gpu_providers
PROVIDERS = {"cpu": ["CPUExecutionProvider"], **GPU_PROVIDERS}


class OrtSession(Session):
    def _run(self, inputs):
        return self.info["session"].run([self.output_name], inputs)[0]


def session_options(threads: int | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # Idle intra-op threads otherwise spin after each run and steal the CPU from whatever runs next
    # (measured: torch looked 4x slower interleaved with spinning ORT sessions).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return so


def _task_of(path: Path, task: str | None) -> str:
    if task:
        return task
    meta = read_artifact_meta(path)
    if meta.get("task"):
        return meta["task"]
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if cfg.is_file():
        return detect_task(json.loads(cfg.read_text())).name
    raise EdgekitError(f"the task of {path} is unknown (no edgekit.json or config.json beside it)", "pass --task")


def load_onnxruntime(path, device="cpu", threads=None, task=None) -> OrtSession:
    import onnxruntime as ort

    if device not in PROVIDERS:
        raise EdgekitError(f"onnxruntime here has no provider for device '{device}'", "use --device cpu, cuda or tensorrt")
    f = onnx_file(Path(path))
    providers = PROVIDERS["cpu"]
    if device != "cpu":  # before the try below: a missing provider is not a damaged model
        providers = gpu_providers(device, ort.get_available_providers(), model=f)
    try:
        sess = ort.InferenceSession(str(f), session_options(threads), providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/... types for a damaged model
        raise EdgekitError(
            f"{f} is not a valid ONNX model ({str(e).splitlines()[0][:200]})", "export it again with edgekit export"
        ) from None
    t = TASKS[_task_of(f, task)]
    outputs = [o.name for o in sess.get_outputs()]
    if t.output not in outputs:
        raise EdgekitError(f"{f} has no output '{t.output}' (it has {', '.join(outputs)})", "export it with edgekit export")
    names = [i.name for i in sess.get_inputs()]
    if device != "cpu":
        from edgekit.runtimes.ort_gpu import gpu_session

        return gpu_session(sess, f, t, names, device, threads)
    return OrtSession("onnxruntime", f, t.name, names, t.output, device, threads,
                      {"session": sess, "dtypes": input_dtypes(sess)})
