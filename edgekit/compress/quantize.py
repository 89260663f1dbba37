"""Quantize stage: ONNX FP32 -> INT8 through ``onnxruntime.quantization``.

Dynamic mode first fuses the transformer graph with onnxruntime's optimizer (Attention, SkipLayerNorm,
BiasGelu, EmbedLayerNorm) where the family supports it: measured here that is what makes INT8 faster than
Optimum's plain dynamic preset. Static mode writes a QDQ graph calibrated on the user's data, quantizing
only the matmuls by default (Softmax, LayerNorm, residual Adds and the classifier stay in float) because
quantizing everything was measured to cost 22 accuracy points on a 77-class task.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from edgekit.version import __version__
from edgekit.artifacts import copy_side_file, folder_size, scratch_dir
from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option
from edgekit.progress import Progress
from edgekit.reports import RenderedReport, SCHEMA_VERSION, Section, fmt_mib, fmt_ratio
from edgekit.runtimes.base import ARTIFACT_FILE, ONNX_NAME, onnx_file, read_artifact_meta

MODES = ("dynamic", "static")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
COMPUTE_OPS = {"MatMul", "Gemm", "Attention", "Conv"}
# What onnxruntime's quantizers emit (IntegerOpsRegistry, QLinearOpsRegistry): INT8 nodes, never "float ops".
QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "QLinearMatMul", "MatMulIntegerToFloat",
                 "ConvInteger", "QLinearConv", "QGemm", "QEmbedLayerNormalization", "DynamicQuantizeLSTM"}


class QuantizeConfig(StageConfig):
    mode: Literal["dynamic", "static"] = option(
        "dynamic", "dynamic: INT8 weights, activations quantized at run time (best on CPU); static: QDQ calibrated.")
    # Per-channel weight scales: measured on all-MiniLM-L6-v2 dynamic INT8, mean embedding cosine vs FP32 is
    # 0.957 per-tensor and 0.992 per-channel, at the same size.
    per_channel: bool = option(True, "Weight scales per output channel.", flag="--per-channel/--per-tensor")
    optimize: Optional[bool] = option(
        None, "Fuse the transformer graph before quantizing (default: on for dynamic where supported).")
    calibration_data: Optional[str] = option(None, "Static mode: text to calibrate activation ranges on.", path=True)
    calibration_samples: int = option(128, "Static mode: examples of the calibration text to use.", ge=1)
    calibration_method: Literal["minmax", "entropy", "percentile"] = option("minmax", "Static mode: range estimator.")
    # The calibration text's column: a command fills it from the data's --text-column when not set.
    text_column: Optional[str] = option(None, "Column of the calibration text.", cli=False)
    exclude_nodes: list[str] = option(help="Node name to keep in float (repeat, or comma-separate).",
                                      default_factory=list)
    exclude_op_types: list[str] = option(help="Op type to keep in float, e.g. Attention (repeatable).",
                                         default_factory=list)
    # None: on where the CPU lacks VNNI (u8s8 products can saturate there)
    reduce_range: Optional[bool] = option(None, "7-bit weights (default: only on CPUs without VNNI).")
    # TensorRT needs zero-point-free activations; ORT on CPU does not
    symmetric_activations: bool = option(
        False, "Static mode: zero-point-free activation scales, as TensorRT needs for Q/DQ engines.")
    max_length: int = option(128, "Truncation of the calibration text, in tokens.", ge=1, cli=False)


@dataclass
class QuantizeReport(RenderedReport):
    source: str
    output: str
    mode: str
    size_before: int
    size_after: int
    fused: dict
    quantized_nodes: int
    nodes_in_float: list
    float_op_counts: dict
    calibration: dict | None
    seconds: float
    config: dict
    verification: dict | None = None  # the verify report, when quantize ran with --data
    schema_version: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return self.verification is None or bool(self.verification["passed"])

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        floats = d.get("nodes_in_float") or []
        row = [d.get("output"), fmt_mib(d.get("size_before")), fmt_mib(d.get("size_after")),
               fmt_ratio(d.get("size_before"), d.get("size_after")), d.get("quantized_nodes"), len(floats)]
        notes = []
        if d.get("fused"):
            notes.append("Fused before quantizing: " + ", ".join(f"{k} x{v}" for k, v in d["fused"].items()) + ".")
        if floats:
            notes.append("Compute nodes kept in float: " + ", ".join(f"`{n['name']}` ({n['op_type']})" for n in floats) + ".")
        if d.get("calibration"):
            c = d["calibration"]
            notes.append(f"Calibrated ({c.get('method')}) on {c.get('samples')} examples from `{c.get('source')}`.")
        return [Section(f"Quantize ({d.get('mode')} INT8)", ["model", "size before (MiB)", "size after (MiB)",
                                                              "smaller by", "INT8 nodes", "compute nodes in float"],
                        [row], notes=notes)]


@contextlib.contextmanager
def _inside(folder: Path):
    """chdir for the duration of a library call that writes into the current folder (contextlib.chdir is 3.11+)."""
    old = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(old)


def _has_vnni() -> bool:
    from edgekit.benchmarks.environment import environment

    env = environment()
    return bool(set(env["isa_flags"]) & {"avx512_vnni", "avx_vnni", "amx_int8"}) or env["machine"] in ("arm64", "aarch64")


def default_reduce_range() -> bool:
    """What ``reduce_range: null`` means on this machine: 7-bit weights where the CPU lacks VNNI (u8s8 products
    can saturate there). It differs between machines, so compress records the value it used in its recipe."""
    return not _has_vnni()


def _fusion_type(folder: Path) -> str | None:
    from edgekit.tasks import ENCODER_FAMILIES

    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    return ENCODER_FAMILIES.get(json.loads(cfg.read_text()).get("model_type"))


def _fuse(src: Path, dst: Path, model_type: str) -> dict:
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads=0/hidden_size=0: detected per attention block from the graph, so pruned layers with
    # different head counts still fuse.
    opt = optimize_model(str(src), model_type=model_type, num_heads=0, hidden_size=0)
    opt.save_model_to_file(str(dst))
    return {k: v for k, v in opt.get_fused_operator_statistics().items() if v}


def _analyse(model_path: Path) -> tuple[int, list, dict]:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    quantized, in_float, float_ops = 0, [], Counter()
    for n in graph.node:
        if n.op_type in QUANTIZED_OPS:
            quantized += 1
        elif n.op_type in COMPUTE_OPS:
            if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input):
                quantized += 1
            else:
                in_float.append({"name": n.name, "op_type": n.op_type})
        elif n.op_type not in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            float_ops[n.op_type] += 1
    return quantized, in_float, dict(float_ops)


def _classifier_nodes(model_path: Path, output_name: str) -> list[str]:
    """The last compute node before the logits: kept in float in static mode (small, accuracy-critical)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producers = {o: n for n in graph.node for o in n.output}
    frontier, seen = [output_name], set()
    while frontier:
        name = frontier.pop()
        node = producers.get(name)
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            return [node.name]
        frontier.extend(node.input)
    return []


class _CalibrationReader:
    """Feeds tokenized calibration examples one at a time (varied real lengths) to the calibrator."""

    def __init__(self, batches, step):
        self._it, self._step = iter(batches), step

    def get_next(self):
        b = next(self._it, None)
        if b is not None:
            self._step.advance()
        return b

    def rewind(self):  # pragma: no cover - only used by some calibrators
        pass


def _calibration_batches(folder: Path, cfg: QuantizeConfig, input_names: list[str], task: str):
    import numpy as np

    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import encode, load_examples, max_tokens
    from edgekit.tasks import TASKS

    if not cfg.calibration_data:
        raise EdgekitError("static quantization needs calibration data", "pass --calibration-data FILE (the text column is used)")
    ex = load_examples(cfg.calibration_data, TASKS[task], cfg.text_column, limit=cfg.calibration_samples, use_labels=False,
                       flag="--calibration-data")
    tok = load_tokenizer(folder)
    try:  # the exported folder keeps the checkpoint's config.json: no more tokens than it has positions
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        model_config = {}
    max_length = max_tokens(model_config if isinstance(model_config, dict) else {}, tok, cfg.max_length)
    out = []
    for text in ex.texts:
        arrays, _ = encode(tok, [text], max_length, words=isinstance(text, list))
        out.append({k: v for k, v in arrays.items() if k in input_names})
    if cfg.calibration_method != "minmax":
        # The histogram calibrators stack every sample's tensors, so all samples need one shape: pad to the
        # longest (the attention mask keeps padding out of the attention itself).
        longest = max(b["input_ids"].shape[1] for b in out)
        pad_id = tok.pad_token_id or 0
        for b in out:
            extra = longest - b["input_ids"].shape[1]
            for k in b:
                b[k] = np.pad(b[k], ((0, 0), (0, extra)), constant_values=pad_id if k == "input_ids" else 0)
    return out, {"source": ex.source, "samples": len(ex), "method": cfg.calibration_method}


def quantize_onnx(src_folder: Path, dst_folder: Path, cfg: QuantizeConfig, progress: Progress,
                  recorded_source: Path | None = None) -> QuantizeReport:
    """Quantize the ONNX artifact in ``src_folder`` into ``dst_folder`` (already staged).

    ``recorded_source`` is what to record as the input when ``src_folder`` is itself staged or scratch space
    (compress, quantize from a checkpoint): the path the input will have once the run is in place.
    """
    import onnx

    from edgekit.runtimes.ort_gpu import require_onnxruntime

    require_onnxruntime()
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if cfg.mode not in MODES:
        raise EdgekitError(f"unknown quantization mode '{cfg.mode}'", f"use --mode {' or --mode '.join(MODES)}")
    if cfg.calibration_method not in CALIBRATION_METHODS:
        raise EdgekitError(f"unknown calibration method '{cfg.calibration_method}'", f"use one of {', '.join(CALIBRATION_METHODS)}")
    t0 = time.perf_counter()
    src = onnx_file(src_folder)
    meta = read_artifact_meta(src)
    try:
        onnx.checker.check_model(str(src))
    except Exception as e:  # onnx raises ValidationError or DecodeError for damaged files
        raise EdgekitError(f"{src} is not a valid ONNX model ({str(e).splitlines()[0][:160]})", "export it again with edgekit export") from None
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    input_names = [i.name for i in sess.get_inputs()]
    output_names = [o.name for o in sess.get_outputs()]
    task = meta.get("task") or ("feature-extraction" if "last_hidden_state" in output_names else "text-classification")
    del sess
    static = cfg.mode == "static"
    per_channel = cfg.per_channel
    reduce_range = cfg.reduce_range if cfg.reduce_range is not None else default_reduce_range()
    fusion = _fusion_type(src.parent)
    optimize = cfg.optimize if cfg.optimize is not None else (not static and fusion is not None)
    if optimize and fusion is None:
        raise EdgekitError("graph fusion is not available for this model family", "drop --optimize")
    fused, calibration = {}, None
    with scratch_dir("edgekit-quant-") as tmp:
        work = src
        if optimize:
            with progress.step("Fusing transformer graph (onnxruntime optimizer)"):
                work = Path(tmp) / "fused.onnx"
                fused = _fuse(src, work, fusion)
        names = {x.name for x in onnx.load(str(work), load_external_data=False).graph.node}
        unknown = [n for n in cfg.exclude_nodes if n not in names]
        if unknown:
            raise EdgekitError(
                f"--exclude-nodes names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not in the "
                f"{'fused ' if optimize else ''}graph (its nodes are named like {', '.join(sorted(names)[:3])})",
                "list the graph's node names with Netron or onnx, or pass --no-optimize to use the exported names",
            )
        out = dst_folder / ONNX_NAME
        if static:
            registry = set(QDQRegistry)
            op_types = [o for o in ("MatMul", "Gemm") if o not in cfg.exclude_op_types]
            exclude = list(cfg.exclude_nodes) + _classifier_nodes(work, output_names[0]) * (task != "feature-extraction")
            with progress.step("Preparing graph for calibration (shape inference)"):
                pre = Path(tmp) / "pre.onnx"
                # Symbolic shape inference cannot follow every exported graph (opset 18 Reduce ops); the ONNX
                # shape inference and ORT's basic optimizations that follow are what calibration needs.
                # When it gives up it also dumps sym_shape_infer_temp.onnx and a <uuid>.data file into the
                # current folder, so it runs from inside the scratch folder, never from the user's.
                with _inside(Path(tmp)):
                    try:
                        quant_pre_process(str(work.resolve()), str(pre.resolve()))
                    except Exception:  # noqa: BLE001 - the symbolic inferencer raises a bare Exception
                        quant_pre_process(str(work.resolve()), str(pre.resolve()), skip_symbolic_shape=True)
            batches, calibration = _calibration_batches(src.parent, cfg, input_names, task)
            method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                      "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
            with progress.step(f"Calibrating ({cfg.calibration_method}, {len(batches)} samples)", total=len(batches)) as step:
                quantize_static(str(pre), str(out), _CalibrationReader(batches, step), quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=op_types, per_channel=per_channel, reduce_range=reduce_range,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_exclude=exclude,
                                calibrate_method=method,
                                extra_options={"ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": True,
                                               "CalibTensorRangeSymmetric": cfg.symmetric_activations})
        else:
            registry = set(IntegerOpsRegistry)
            op_types = [o for o in sorted(registry) if o not in cfg.exclude_op_types]
            with progress.step("Quantizing weights to INT8 (dynamic)"):
                # DefaultTensorType: the fused graph's contrib ops have no type info the quantizer can infer.
                quantize_dynamic(str(work), str(out), op_types_to_quantize=op_types, per_channel=per_channel,
                                 reduce_range=reduce_range, weight_type=QuantType.QInt8,
                                 nodes_to_exclude=list(cfg.exclude_nodes),
                                 extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    bad_types = [o for o in cfg.exclude_op_types if o not in registry]
    for f in src.parent.iterdir():
        if f.is_file() and f.suffix != ".onnx" and f.name not in (ARTIFACT_FILE, "export_report.json", "quantize_report.json") and not f.name.endswith(".onnx_data"):
            copy_side_file(f, dst_folder / f.name)
    n_quant, in_float, float_ops = _analyse(out)
    quantized_from = str(recorded_source or src)
    (dst_folder / ARTIFACT_FILE).write_text(json.dumps({
        "edgekit_version": __version__, "stage": "quantize", "task": task, "mode": cfg.mode,
        "source": meta.get("source", quantized_from), "quantized_from": quantized_from,
    }, indent=2))
    report = QuantizeReport(quantized_from, "", cfg.mode, folder_size(src), folder_size(out), fused, n_quant, in_float,
                            float_ops, calibration, time.perf_counter() - t0,
                            {**cfg.to_dict(), "per_channel": per_channel, "optimize": optimize, "reduce_range": reduce_range,
                             "exclude_op_types_not_quantizable": bad_types})
    return report
