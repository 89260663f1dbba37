"""onnxruntime on the CPU (CUDA/TensorRT execution providers arrive with the gpu extra)."""

from __future__ import annotations

import json
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.runtimes.base import Session, onnx_file, read_artifact_meta
from edgekit.runtimes.ort_gpu import GPU_PROVIDERS, gpu_providers, input_dtypes, require_onnxruntime
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
    # Errors only: onnxruntime warns at every load that an overridable initializer (a decoder's optional
    # logits_to_keep) is not folded as a constant, which is its purpose; what edgekit needs from a session's
    # other warnings (nodes left to the CPU under a GPU provider) it reads from the profile (ort_gpu.node_placement).
    so.log_severity_level = 3
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


def session_error(exc: Exception, f: Path, device: str) -> EdgekitError:
    """One sentence for a session that onnxruntime would not create, by the error type it raised.

    Only a file that does not parse or whose graph does not check is "not a valid ONNX model"; a missing
    kernel, a provider that failed, or memory are other problems with other fixes."""
    import onnxruntime as ort

    kind = type(exc).__name__
    lines = [line for line in str(exc).splitlines() if line.strip()]
    detail = (lines[0] if lines else kind).split(" : ")[-1].replace(f"Load model from {f} failed:", "").strip()[:200]
    version = ort.__version__
    if isinstance(exc, MemoryError) or "bad_alloc" in str(exc) or "Failed to allocate" in str(exc):
        return EdgekitError(f"not enough memory to load {f} on '{device}' ({detail})",
                            "close other programs, use a smaller model, or run on a machine with more memory")
    if kind in ("InvalidProtobuf", "InvalidGraph", "NoModel", "NoSuchFile"):
        return EdgekitError(f"{f} is not a valid ONNX model ({detail})", "export it again with edgekit export")
    if kind == "NotImplemented":
        return EdgekitError(f"onnxruntime {version} has no kernel on '{device}' for an operator of {f} ({detail})",
                            "export without that operator (a lower --opset, no --optimize), or upgrade onnxruntime")
    if kind == "EPFail":
        from edgekit.runtimes.ort_gpu import VERSION_HINT

        return EdgekitError(f"onnxruntime's {PROVIDERS[device][0]} failed to load {f} ({detail})", VERSION_HINT)
    if "ValidateOpsetForDomain" in str(exc):  # the message starts with a C++ signature: keep its two facts
        import re

        facts = re.findall(r"(Opset \d+ is under development|official support for domain \S+ is till opset \d+)", str(exc))
        return EdgekitError(f"{f} uses an opset that onnxruntime {version} does not support ({'; '.join(facts) or detail})",
                            "export it again with a lower --opset, or upgrade onnxruntime")
    return EdgekitError(f"onnxruntime {version} could not load {f} on '{device}' ({detail})",
                        "check that the file is an ONNX model edgekit exported and that onnxruntime is up to date")


def create_session(f: Path, device: str, threads: int | None, provider_options: dict | None = None):
    """An onnxruntime session of ``f`` on ``device``: its providers (a missing provider refused before the model
    is read: it is not a damaged model; ``provider_options`` for TensorRT, else sized from the model), the
    profiler on for the node-placement count beside every GPU figure (ort_gpu.node_placement), and a creation
    failure told apart by cause (session_error). Encoders (load_onnxruntime) and decoders (runtimes.decoder)."""
    import onnxruntime as ort

    providers, so = PROVIDERS["cpu"], session_options(threads)
    if device != "cpu":
        from edgekit.runtimes.ort_gpu import profiling_options

        providers = gpu_providers(device, ort.get_available_providers(), provider_options, model=f)
        profiling_options(so)
    try:
        return ort.InferenceSession(str(f), so, providers=providers)
    except Exception as e:
        raise session_error(e, f, device) from None


def _checked_outputs(sess, f: Path, task):
    t = TASKS[_task_of(f, task)]
    outputs = [o.name for o in sess.get_outputs()]
    if t.output not in outputs:
        raise EdgekitError(f"{f} has no output '{t.output}' (it has {', '.join(outputs)})", "export it with edgekit export")
    return t, [i.name for i in sess.get_inputs()]


def load_onnxruntime(path, device="cpu", threads=None, task=None) -> OrtSession:
    require_onnxruntime()
    if device not in PROVIDERS:
        raise EdgekitError(f"onnxruntime here has no provider for device '{device}'", "use --device cpu, cuda or tensorrt")
    f = onnx_file(Path(path))
    sess = create_session(f, device, threads)
    if device != "cpu":
        from edgekit.runtimes.ort_gpu import gpu_session, profile_discarded_on_error

        with profile_discarded_on_error(sess):
            t, names = _checked_outputs(sess, f, task)
            return gpu_session(sess, f, t, names, device, threads)
    t, names = _checked_outputs(sess, f, task)
    return OrtSession("onnxruntime", f, t.name, names, t.output, device, threads,
                      {"session": sess, "dtypes": input_dtypes(sess)})
