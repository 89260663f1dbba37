"""A Triton Inference Server model repository from a release bundle, for fleets that already run Triton.

``triton_repository(bundle, out)`` re-hashes the bundle, then writes::

    OUT/<name>/config.pbtxt          onnxruntime backend, dynamic batching, inputs/outputs read from the ONNX graph
    OUT/<name>/1/model.onnx          the bundle's model, byte for byte (its sha256 is in config.pbtxt's parameters)
    OUT/<name>/1/tokenizer/          the tokenizer and config.json: tokenization is client-side (README.md)
    OUT/<name>_tensorrt/...          with ``engine``: a tensorrt_plan model for an engine built on the target
    OUT/README.md                    how to run it and what a client sends

Bundles carry no TensorRT engine (an engine is built on the device that runs it: ``edgekit engine build``), so
the plan model is written only when one is given. The tokenizer is documented as client-side rather than run in
a Python-backend step: the Python backend needs Triton's own ``triton_python_backend_utils``, which cannot run
here, and a step nobody has run is not shipped. Triton itself has not run here; each ``config.pbtxt`` is parsed
with the ``ModelConfig`` protobuf schema that ``tritonclient`` ships (when it is installed), so a field Triton
does not know is an error now rather than at load time on the fleet.
"""

from __future__ import annotations

import json
import shutil
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.reports import Report

# ONNX TensorProto element type -> Triton data type
_DTYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 5: "TYPE_INT16", 6: "TYPE_INT32", 7: "TYPE_INT64",
           9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 16: "TYPE_BF16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json", "config.json")


@dataclass
class TritonConfig:
    max_batch: int = 16
    max_queue_delay_ms: float = 5.0
    instances: int = 1
    kind: str = "auto"  # auto | cpu | gpu: the instance group's kind
    engine: str | None = None  # a TensorRT engine built on the target from this bundle's model


@dataclass
class TritonReport(Report):
    repository: str
    models: list
    schema_checked: bool
    files: list = field(default_factory=list)


def _tensors(values, what: str, f: Path) -> list[dict]:
    """Triton's view of graph inputs/outputs: the first (batch) dimension dropped, symbolic dims as -1."""
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims:
            raise EdgekitError(f"{what} '{v.name}' of {f} has no batch dimension", "export the model with edgekit export")
        if t.elem_type not in _DTYPES:
            raise EdgekitError(f"{what} '{v.name}' of {f} has an element type Triton does not take ({t.elem_type})",
                               "export the model with edgekit export")
        out.append({"name": v.name, "data_type": _DTYPES[t.elem_type], "dims": dims[1:] or [1]})
    return out


def _block(kind: str, tensors: list[dict]) -> str:
    items = ",\n".join(f'  {{\n    name: "{t["name"]}"\n    data_type: {t["data_type"]}\n    dims: [ '
                       f'{", ".join(str(d) for d in t["dims"])} ]\n  }}' for t in tensors)
    return f"{kind} [\n{items}\n]\n"


def config_text(name: str, platform_or_backend: str, inputs, outputs, cfg: TritonConfig, params: dict) -> str:
    head = (f'backend: "{platform_or_backend}"' if platform_or_backend == "onnxruntime"
            else f'platform: "{platform_or_backend}"')
    text = f'name: "{name}"\n{head}\nmax_batch_size: {cfg.max_batch}\n'
    text += _block("input", inputs) + _block("output", outputs)
    text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {int(round(cfg.max_queue_delay_ms * 1000))}\n}}\n"
    kind = {"auto": "KIND_AUTO", "cpu": "KIND_CPU", "gpu": "KIND_GPU"}[cfg.kind]
    text += f"instance_group [\n  {{\n    count: {cfg.instances}\n    kind: {kind}\n  }}\n]\n"
    for k, v in params.items():
        text += f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}\n'
    return text


def parse_config(text: str, where) -> bool:
    """Parse with tritonclient's ModelConfig schema; False when tritonclient is not installed."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return False
    try:
        text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as e:  # a bug in what edgekit wrote, not the user's input
        raise RuntimeError(f"{where} does not parse as a Triton ModelConfig: {e}") from None
    return True


def triton_repository(bundle, out, config: TritonConfig | None = None, overwrite: bool = False) -> TritonReport:
    import onnx

    from edgekit.artifacts import sha256_file, staged_output
    from edgekit.release.bundle import MANIFEST, checked_bundle

    cfg = config or TritonConfig()
    if cfg.kind not in ("auto", "cpu", "gpu"):
        raise EdgekitError(f"unknown instance kind '{cfg.kind}'", "use auto, cpu or gpu")
    if cfg.max_batch < 1 or cfg.instances < 1 or cfg.max_queue_delay_ms < 0:
        raise EdgekitError("--max-batch and --instances must be at least 1 and --max-queue-delay-ms at least 0",
                           "give positive numbers")
    p = Path(bundle)
    if not p.exists():
        raise EdgekitError(f"{p} does not exist", "point at a release bundle folder or its .tar.gz")
    engine = Path(cfg.engine) if cfg.engine else None
    if engine is not None and (not engine.is_file() or engine.stat().st_size == 0):
        raise EdgekitError(f"--engine {engine} is not a TensorRT engine file", "give the model.engine that "
                           "`edgekit engine build` wrote on the target")
    with ExitStack() as stack:
        if p.is_dir() and not (p / MANIFEST).is_file():
            raise EdgekitError(f"{p} is not a release bundle (no {MANIFEST})", "run `edgekit release build` first")
        p, _ = checked_bundle(p, stack, "to write a Triton repository")
        manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("task") == "text-generation":
            raise EdgekitError("a text-generation bundle is not written as a Triton repository (a decoder with a KV "
                               "cache needs Triton's generation backends, not the onnxruntime backend)",
                               "serve it with `edgekit serve`, or use Triton's TensorRT-LLM backend")
        name = manifest["name"]
        model = manifest["models"]["int8"]
        src = p / model["path"]
        graph = onnx.load(str(src), load_external_data=False).graph
        inits = {i.name for i in graph.initializer}
        inputs = _tensors([i for i in graph.input if i.name not in inits], "input", src)
        outputs = _tensors(graph.output, "output", src)
        params = {"edgekit_bundle": name, "edgekit_model_sha256": model["sha256"], "edgekit_task": manifest["task"],
                  "edgekit_accuracy_gate": "passed" if (manifest.get("gates") or {}).get("passed") else "failed"}
        models, checked = [], True
        with staged_output(out, overwrite, protect=(p.resolve(),)) as staging:
            d = staging / name
            (d / "1").mkdir(parents=True)
            for f in sorted(src.parent.glob(src.name + "*")):  # model.onnx and any external-data file beside it
                shutil.copy2(f, d / "1" / f.name)
            if sha256_file(d / "1" / src.name) != model["sha256"]:
                raise EdgekitError(f"{src} changed while it was copied", "run the command again")
            text = config_text(name, "onnxruntime", inputs, outputs, cfg, params)
            (d / "config.pbtxt").write_text(text, encoding="utf-8")
            checked &= parse_config(text, d / "config.pbtxt")
            # inside the version folder: Triton reads only model.onnx there, and the tokenizer is versioned with
            # the model it belongs to (a non-numeric folder beside 1/ would be taken for a version)
            (d / "1" / "tokenizer").mkdir()
            for f in TOKENIZER_FILES:
                if (src.parent / f).is_file():
                    shutil.copy2(src.parent / f, d / "1" / "tokenizer" / f)
            models.append({"name": name, "backend": "onnxruntime", "inputs": inputs, "outputs": outputs})
            if engine is not None:
                t = staging / f"{name}_tensorrt"
                (t / "1").mkdir(parents=True)
                shutil.copy2(engine, t / "1" / "model.plan")
                text = config_text(t.name, "tensorrt_plan", inputs, outputs, cfg,
                                   {**params, "edgekit_engine_sha256": sha256_file(engine)})
                (t / "config.pbtxt").write_text(text, encoding="utf-8")
                checked &= parse_config(text, t / "config.pbtxt")
                models.append({"name": t.name, "platform": "tensorrt_plan", "inputs": inputs, "outputs": outputs})
            (staging / "README.md").write_text(_readme(name, manifest, inputs, outputs, cfg, engine is not None),
                                               encoding="utf-8")
            files = sorted(x.relative_to(staging).as_posix() for x in staging.rglob("*") if x.is_file())
    return TritonReport(str(Path(out).resolve()), models, checked, files)


def _readme(name: str, manifest: dict, inputs, outputs, cfg: TritonConfig, has_engine: bool) -> str:
    ins = ", ".join(f"`{t['name']}` ({t['data_type']}, [batch, {', '.join(map(str, t['dims']))}])" for t in inputs)
    outs = ", ".join(f"`{t['name']}` ({t['data_type']}, [batch, {', '.join(map(str, t['dims']))}])" for t in outputs)
    engine = (f"\n`{name}_tensorrt/` serves the TensorRT engine given to edgekit (built on the target from the same "
              "ONNX model); it takes the same inputs.\n") if has_engine else ""
    return f"""# Triton model repository for `{name}`

Written by `edgekit release triton` from a verified bundle (task `{manifest['task']}`, accuracy gate
{'passed' if (manifest.get('gates') or {}).get('passed') else 'FAILED'}, model sha256 `{manifest['models']['int8']['sha256']}`).

    tritonserver --model-repository=$(pwd)

`{name}/` runs the bundle's ONNX model on Triton's onnxruntime backend with dynamic batching (up to
{cfg.max_batch} per batch, {cfg.max_queue_delay_ms:g} ms queue delay).{engine}

Inputs: {ins}. Outputs: {outs}.

Tokenization is client-side: load `{name}/1/tokenizer/` with `transformers.AutoTokenizer.from_pretrained`, call it
with `return_tensors="np"` (truncation to the model's maximum length) and send each array as int64. The labels
of a classifier are `id2label` in `{name}/1/tokenizer/config.json`; feature-extraction clients mean-pool
`last_hidden_state` over the attention mask, as edgekit verify and edgekit serve do.

This repository was checked against Triton's ModelConfig schema (tritonclient); Triton itself has not run it here.
"""
