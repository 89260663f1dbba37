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

from pydantic import field_validator, model_validator

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
                 "ConvInteger", "QLinearConv", "QGemm", "QEmbedLayerNormalization", "DynamicQuantizeLSTM",
                 "MatMulNBits"}
BITS = (4, 8)
LM_HEAD_CHOICES = ("4", "8", "float")


class QuantizeConfig(StageConfig):
    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in BITS:
            raise ValueError(f"must be one of {', '.join(map(str, BITS))}")
        return v

    @model_validator(mode="after")
    def _format_is_static(self):
        if self.format != "qdq" and (self.mode != "static" or self.bits != 8):
            given = "--bits 4" if self.bits != 8 else f"--mode {self.mode}"
            raise EdgekitError(f"--format {self.format} applies to static INT8 only, not to {given}",
                               "add --mode static --calibration-data FILE, or drop --format")
        return self

    mode: Literal["dynamic", "static"] = option(
        "dynamic", "dynamic: INT8 weights, activations quantized at run time (best on CPU); static: calibrated.")
    format: Literal["qdq", "qoperator"] = option(
        "qdq", "Static mode: qdq (Q/DQ pairs, what TensorRT builds from) or qoperator (QLinearMatMul and the like, "
               "fused first: the fast static form on a CPU).")
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
    # Weight-only INT4 (decoders): onnxruntime's MatMulNBits, block-wise scales and zero points, round to nearest.
    bits: int = option(8, "Weight bits: 8 (INT8 as --mode says) or 4 (weight-only, block-wise "
                                    "MatMulNBits: text-generation models).")
    # 32 as onnxruntime-genai's model builder uses for INT4: smaller blocks cost a little size for accuracy.
    block_size: int = option(32, "--bits 4: weights per quantization block (a power of two, 16 to 256).",
                             between=(16, 256))
    # 4 (int8 compute) is what makes INT4 fast on x86 and Arm CPUs: with 0 MatMulNBits dequantizes to float
    # and was slower than INT8 (onnxruntime#23004).
    accuracy_level: int = option(4, "--bits 4: MatMulNBits compute type (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8).",
                                 between=(0, 4))
    # An INT4 lm_head is where generation breaks first (onnxruntime PR #24384): 8-bit by default.
    lm_head: Literal["4", "8", "float"] = option("8", "--bits 4: bits of the lm_head projection (4, 8 or float).")
    # The token embedding is the largest matrix of a small LM (SmolLM2-135M: 113 MB of its 540): 4-bit blocks
    # (onnxruntime's GatherBlockQuantized, which takes 4 bits only) or float.
    embeddings: Literal["4", "float"] = option("4", "--bits 4: the token-embedding table at 4 bits or in float.")
    # NNCF's compress_weights (AWQ + scale estimation, ONNX backend) is the data-aware method; rtn needs no data.
    method: Literal["rtn", "awq"] = option("rtn", "--bits 4: rtn (round to nearest) or awq (NNCF's AWQ and scale "
                                                  "estimation, on --calibration-data).")


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
    weight_bits: dict | None = None  # --bits 4: weight MatMul names by storage ("4", "8", "float")
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
        wb = d.get("weight_bits")
        if wb:
            notes.append("Weight MatMuls: " + ", ".join(f"{len(v)} at {k} bits" if k != "float" else f"{len(v)} in float"
                                                        for k, v in wb.items() if v) + ".")
        form = ", qoperator" if (d.get("config") or {}).get("format") == "qoperator" else ""
        title = f"Quantize ({d.get('mode')})" if wb else f"Quantize ({d.get('mode')} INT8{form})"
        return [Section(title, ["model", "size before (MiB)", "size after (MiB)",
                                                              "smaller by", "quantized nodes", "compute nodes in float"],
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


def _task_from_config(folder: Path) -> str | None:
    """The task of a model folder without edgekit.json (another exporter's), from its config.json."""
    from edgekit.tasks import detect_task

    cfg = folder / "config.json"
    try:
        return detect_task(json.loads(cfg.read_text(encoding="utf-8"))).name if cfg.is_file() else None
    except (ValueError, EdgekitError):
        return None


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


def encoded_examples(folder: Path, data, task: str, text_column: str | None, limit: int, max_length: int,
                     input_names: list[str], flag: str) -> tuple[list[dict], str]:
    """Up to ``limit`` texts of ``data`` tokenized one at a time (batch 1, their real lengths, no padding) as
    the graph's inputs, and the data's resolved path. Calibration and culprit ranking both read text so."""
    from edgekit.checkpoint import load_tokenizer
    from edgekit.data import encode, load_examples, max_tokens
    from edgekit.tasks import TASKS

    ex = load_examples(data, TASKS[task], text_column, limit=limit, use_labels=False, flag=flag)
    tok = load_tokenizer(folder)
    try:  # the exported folder keeps the checkpoint's config.json: no more tokens than it has positions
        model_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        model_config = {}
    max_length = max_tokens(model_config if isinstance(model_config, dict) else {}, tok, max_length)
    out = []
    for text in ex.texts:
        arrays, _ = encode(tok, [text], max_length, words=isinstance(text, list))
        out.append({k: v for k, v in arrays.items() if k in input_names})
    return out, ex.source


def _calibration_batches(folder: Path, cfg: QuantizeConfig, input_names: list[str], task: str):
    import numpy as np

    if not cfg.calibration_data:
        raise EdgekitError("static quantization needs calibration data", "pass --calibration-data FILE (the text column is used)")
    out, source = encoded_examples(folder, cfg.calibration_data, task, cfg.text_column, cfg.calibration_samples,
                                   cfg.max_length, input_names, "--calibration-data")
    if cfg.calibration_method != "minmax":
        # The histogram calibrators stack every sample's tensors, so all samples need one shape: pad to the
        # longest (the attention mask keeps padding out of the attention itself).
        from edgekit.checkpoint import load_tokenizer

        longest = max(b["input_ids"].shape[1] for b in out)
        pad_id = load_tokenizer(folder).pad_token_id or 0
        for b in out:
            extra = longest - b["input_ids"].shape[1]
            for k in b:
                b[k] = np.pad(b[k], ((0, 0), (0, extra)), constant_values=pad_id if k == "input_ids" else 0)
    return out, {"source": source, "samples": len(out), "method": cfg.calibration_method}


@dataclass
class SourceModel:
    """The FP32 ONNX model a quantizer starts from, checked to load, with its task and input/output names."""

    path: Path
    meta: dict
    task: str
    input_names: list
    output_names: list


def open_source(src_folder: Path) -> SourceModel:
    import onnx

    from edgekit.runtimes.ort_gpu import require_onnxruntime

    require_onnxruntime()
    import onnxruntime as ort

    src = onnx_file(src_folder)
    meta = read_artifact_meta(src)
    try:
        onnx.checker.check_model(str(src))
        checked = None
    except Exception as e:  # onnx raises ValidationError or DecodeError for damaged files
        checked = e  # or a graph of onnxruntime contrib ops the checker does not know (onnxruntime-genai's builder)
    try:
        sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types
        reason = checked if checked is not None else e
        raise EdgekitError(f"{src} is not a valid ONNX model ({str(reason).splitlines()[0][:160]})",
                           "export it again with edgekit export") from None
    input_names = [i.name for i in sess.get_inputs()]
    output_names = [o.name for o in sess.get_outputs()]
    task = meta.get("task") or _task_from_config(src.parent) or (
        "feature-extraction" if "last_hidden_state" in output_names else "text-classification")
    return SourceModel(src, meta, task, input_names, output_names)


@dataclass
class PreparedGraph:
    """The FP32 graph onnxruntime's quantizer reads for a config: fused when ``optimize`` is on, shape-inferred
    for calibration in static mode. Its node names are the ones ``exclude_nodes`` takes (culprit ranking
    reports them), so quantize_onnx and culprit ranking both get it from :func:`prepare_graph`."""

    source: SourceModel
    path: Path
    optimize: bool
    fused: dict


def prepare_graph(source: SourceModel, cfg: QuantizeConfig, scratch: Path, progress: Progress) -> PreparedGraph:
    """Fuse (``optimize``) and, in static mode, pre-process ``source`` into ``scratch``; check ``exclude_nodes``
    against the names of the result."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if cfg.mode not in MODES:
        raise EdgekitError(f"unknown quantization mode '{cfg.mode}'", f"use --mode {' or --mode '.join(MODES)}")
    if cfg.calibration_method not in CALIBRATION_METHODS:
        raise EdgekitError(f"unknown calibration method '{cfg.calibration_method}'", f"use one of {', '.join(CALIBRATION_METHODS)}")
    static = cfg.mode == "static"
    fusion = _fusion_type(source.path.parent)
    # Fused by default where it pays: dynamic INT8, and static QOperator (fused, with QAttention: the fastest
    # static form measured on all-MiniLM-L6-v2, README); a Q/DQ graph stays as exported, the form TensorRT reads.
    default = fusion is not None and (not static or cfg.format == "qoperator")
    optimize = cfg.optimize if cfg.optimize is not None else default
    if optimize and fusion is None:
        raise EdgekitError("graph fusion is not available for this model family", "drop --optimize")
    work, fused = source.path, {}
    if optimize:
        with progress.step("Fusing transformer graph (onnxruntime optimizer)"):
            work = scratch / "fused.onnx"
            fused = _fuse(source.path, work, fusion)
    if static:
        with progress.step("Preparing graph for calibration (shape inference)"):
            pre = scratch / "pre.onnx"
            # Symbolic shape inference cannot follow every exported graph (opset 18 Reduce ops); the ONNX
            # shape inference and ORT's basic optimizations that follow are what calibration needs.
            # When it gives up it also dumps sym_shape_infer_temp.onnx and a <uuid>.data file into the
            # current folder, so it runs from inside the scratch folder, never from the user's.
            with _inside(scratch):
                try:
                    quant_pre_process(str(work.resolve()), str(pre.resolve()))
                except Exception:  # noqa: BLE001 - the symbolic inferencer raises a bare Exception
                    quant_pre_process(str(work.resolve()), str(pre.resolve()), skip_symbolic_shape=True)
            work = pre
    names = {x.name for x in onnx.load(str(work), load_external_data=False).graph.node}
    unknown = [n for n in cfg.exclude_nodes if n not in names]
    if unknown:
        raise EdgekitError(
            f"--exclude-nodes names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not in the "
            f"{'fused ' if optimize else ''}graph (its nodes are named like {', '.join(sorted(names)[:3])})",
            "list the graph's node names with Netron or onnx, or pass --no-optimize to use the exported names",
        )
    return PreparedGraph(source, work, optimize, fused)


@dataclass
class QuantizerPlan:
    """How onnxruntime's quantizer is called for a config and a prepared graph: one place, so that quantize_onnx
    and culprit ranking (one node at a time) quantize every node the same way."""

    static: bool
    kwargs: dict  # quantize_static / quantize_dynamic keyword arguments
    registry: set  # the op types that quantizer can quantize at all
    # Fused static QOperator: onnxruntime's static QOperator quantizer has no Attention (QLinearOpsRegistry), so
    # the fused Attention's QKV projection would stay float; a dynamic pass gives it QAttention (measured on
    # all-MiniLM-L6-v2: 0.83-0.86x Optimum's dynamic INT8 instead of 1.00-1.05x, the same accuracy).
    attention: dict | None = None

    @property
    def op_types(self) -> list[str]:
        return list(self.kwargs["op_types_to_quantize"]) + ["Attention"] * bool(self.attention)

    def run(self, model_in, out: Path, reader=None, nodes: list | None = None, calibration_cache: Path | None = None):
        from onnxruntime.quantization import quantize_dynamic, quantize_static

        only = {"nodes_to_quantize": nodes} if nodes else {}
        if self.static:
            cache = {"calibration_cache_path": str(calibration_cache)} if calibration_cache is not None else {}
            quantize_static(model_in, str(out), reader, **self.kwargs, **only, **cache)
        else:
            quantize_dynamic(model_in, str(out), **self.kwargs, **only)
        if self.attention:
            first = out.with_name(out.stem + ".matmuls.onnx")
            out.replace(first)
            quantize_dynamic(str(first), str(out), **self.attention, **only)
            first.unlink()


def quantizer_plan(prepared: PreparedGraph, cfg: QuantizeConfig) -> QuantizerPlan:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry, QLinearOpsRegistry

    reduce_range = cfg.reduce_range if cfg.reduce_range is not None else default_reduce_range()
    # DefaultTensorType: the fused graph's contrib ops have no type info the quantizer can infer.
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    common = {"per_channel": cfg.per_channel, "reduce_range": reduce_range, "weight_type": QuantType.QInt8}
    dynamic = {**common, "nodes_to_exclude": list(cfg.exclude_nodes), "extra_options": extra}
    if cfg.mode != "static":
        registry = set(IntegerOpsRegistry)
        return QuantizerPlan(False, {**dynamic, "op_types_to_quantize": [o for o in sorted(registry)
                                                                         if o not in cfg.exclude_op_types]}, registry)
    qoperator = cfg.format == "qoperator"
    registry = set(QLinearOpsRegistry if qoperator else QDQRegistry)
    attention = None
    if qoperator and prepared.fused.get("Attention") and "Attention" not in cfg.exclude_op_types:
        attention, registry = {**dynamic, "op_types_to_quantize": ["Attention"]}, registry | {"Attention"}
    source = prepared.source
    head = _classifier_nodes(prepared.path, source.output_names[0]) * (source.task != "feature-extraction")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration_method]
    return QuantizerPlan(True, {
        **common, "op_types_to_quantize": [o for o in ("MatMul", "Gemm") if o not in cfg.exclude_op_types],
        "nodes_to_exclude": list(cfg.exclude_nodes) + head, "calibrate_method": method,
        "quant_format": QuantFormat.QOperator if qoperator else QuantFormat.QDQ,
        # x86 onnxruntime's QLinear kernels take u8 activations x s8 weights; Q/DQ stays signed, the form
        # TensorRT builds from.
        "activation_type": QuantType.QUInt8 if qoperator else QuantType.QInt8,
        "extra_options": {**extra, "ActivationSymmetric": cfg.symmetric_activations, "WeightSymmetric": True,
                          "CalibTensorRangeSymmetric": cfg.symmetric_activations}}, registry, attention)


def quantize_prepared(prepared: PreparedGraph, plan: QuantizerPlan, cfg: QuantizeConfig, out: Path,
                      progress: Progress, calibration_cache: Path | None = None) -> dict | None:
    """Quantize the whole prepared graph into ``out``; static mode calibrates on ``cfg``'s text first (and
    keeps the ranges in ``calibration_cache`` when given). Returns what the calibration read, if any."""
    if not plan.static:
        with progress.step("Quantizing weights to INT8 (dynamic)"):
            plan.run(str(prepared.path), out)
        return None
    source = prepared.source
    batches, calibration = _calibration_batches(source.path.parent, cfg, source.input_names, source.task)
    what = f"{cfg.calibration_method}, {len(batches)} samples, {cfg.format}"
    with progress.step(f"Calibrating ({what})", total=len(batches)) as step:
        plan.run(str(prepared.path), out, _CalibrationReader(batches, step), calibration_cache=calibration_cache)
    return calibration


def quantize_onnx(src_folder: Path, dst_folder: Path, cfg: QuantizeConfig, progress: Progress,
                  recorded_source: Path | None = None) -> QuantizeReport:
    """Quantize the ONNX artifact in ``src_folder`` into ``dst_folder`` (already staged).

    ``recorded_source`` is what to record as the input when ``src_folder`` is itself staged or scratch space
    (compress, quantize from a checkpoint): the path the input will have once the run is in place.
    """
    t0 = time.perf_counter()
    source = open_source(src_folder)
    src, meta, task = source.path, source.meta, source.task
    if cfg.bits == 4:
        return _weight_only(src, dst_folder, cfg, meta, task, source.output_names, progress, recorded_source, t0)
    out = dst_folder / ONNX_NAME
    with scratch_dir("edgekit-quant-") as tmp:
        prepared = prepare_graph(source, cfg, Path(tmp), progress)
        plan = quantizer_plan(prepared, cfg)
        calibration = quantize_prepared(prepared, plan, cfg, out, progress)
    bad_types = [o for o in cfg.exclude_op_types if o not in plan.registry]
    _copy_side_files(src, dst_folder)
    n_quant, in_float, float_ops = _analyse(out)
    quantized_from = _write_meta(src, dst_folder, cfg, meta, task, recorded_source)
    return QuantizeReport(quantized_from, "", cfg.mode, folder_size(src), folder_size(out), prepared.fused, n_quant,
                          in_float, float_ops, calibration, time.perf_counter() - t0,
                          {**cfg.to_dict(), "per_channel": cfg.per_channel, "optimize": prepared.optimize,
                           "reduce_range": plan.kwargs["reduce_range"], "exclude_op_types_not_quantizable": bad_types})


def _copy_side_files(src: Path, dst_folder: Path) -> None:
    """Config, tokenizer and the like beside the model; not the model, its external data or stage reports."""
    for f in src.parent.iterdir():
        if f.is_file() and f.suffix != ".onnx" and f.name not in (ARTIFACT_FILE, "export_report.json", "quantize_report.json") and not f.name.endswith((".onnx_data", ".onnx.data")):
            copy_side_file(f, dst_folder / f.name)


def _write_meta(src: Path, dst_folder: Path, cfg: QuantizeConfig, meta: dict, task: str, recorded_source) -> str:
    quantized_from = str(recorded_source or src)
    (dst_folder / ARTIFACT_FILE).write_text(json.dumps({
        "edgekit_version": __version__, "stage": "quantize", "task": task, "mode": cfg.mode, "bits": cfg.bits,
        "source": meta.get("source", quantized_from), "quantized_from": quantized_from,
        **({"kv_cache": True} if meta.get("kv_cache") else {}),
    }, indent=2))
    return quantized_from


def weight_bits(model_path: Path) -> dict:
    """How each weight MatMul (and the embedding Gather) is stored: {"4": [names], "8": [names], "float":
    [names]} (MatMulNBits / GatherBlockQuantized by their ``bits`` attribute; a MatMul, Gemm or Gather reading a
    constant weight matrix as float)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name: i for i in graph.initializer}
    out = {"4": [], "8": [], "float": []}

    def matrix(name: str) -> bool:  # an embedding table, not a small constant index list
        return len(weights[name].dims) == 2 and min(weights[name].dims) > 1
    for n in graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            out.setdefault(str(bits), []).append(n.name)
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights:
            out["float"].append(n.name)
        elif n.op_type == "Gather" and n.input[0] in weights and matrix(n.input[0]):
            out["float"].append(n.name)
    return out


def _gemm_to_matmul(model) -> int:
    """Gemm nodes with a constant weight (GPT-2's Conv1D exports as Gemm) rewritten as MatMul + Add, in place,
    so that MatMulNBitsQuantizer, which takes MatMul only, quantizes them. Only the plain form is rewritten
    (alpha = beta = 1, A not transposed); B is transposed into a new initializer when transB is set. Written
    here because neither onnxruntime nor onnx ships this rewrite. Returns the number rewritten."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, count, transposed = [], 0, set()
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if n.op_type != "Gemm" or not plain or len(n.input) < 2 or n.input[1] not in inits:
            nodes.append(n)
            continue
        weight = n.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T.copy()
            transposed.add(n.input[1])
            weight = n.input[1] + "_t"
            model.graph.initializer.append(numpy_helper.from_array(w, weight))
        has_bias = len(n.input) > 2 and n.input[2]
        product = n.output[0] + "_matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], weight], [product], name=n.name + "_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, n.input[2]], [n.output[0]], name=n.name + "_Add"))
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    for name in transposed - used:  # a transposed B's old copy, when nothing else reads it
        model.graph.initializer.remove(inits[name])
    return count


def _fold_weight_transposes(model) -> int:
    """A MatMul or Gather whose weight is Transpose(initializer) — a lm_head tied to the embedding, or the
    embedding tied to the lm_head — gets the transposed matrix as its own initializer, so that it can be
    quantized (otherwise it stays float: the largest matrix read per token, or a float copy in memory). The
    other reader keeps the original. Returns the count."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    readers = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    count = 0
    for n in list(model.graph.node):
        # the weight input: a MatMul's B, a Gather's table (onnxruntime-genai's builder ties the embedding to
        # the lm_head as Gather(Transpose(lm_head weight)))
        slot = {"MatMul": 1, "Gather": 0}.get(n.op_type)
        t = producers.get(n.input[slot]) if slot is not None and len(n.input) > slot else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        w = numpy_helper.to_array(inits[t.input[0]])
        if w.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = t.output[0] + "_folded"
        model.graph.initializer.append(numpy_helper.from_array(w.T.copy(), name))
        n.input[slot] = name
        if all(r is n for r in readers[t.output[0]]):
            model.graph.node.remove(t)
        count += 1
    return count


def prefill_feeds(graph, folder: Path, data, text_column: str | None, limit: int | None, max_length: int,
                  flag: str) -> tuple[list, str]:
    """Prefill inputs for a decoder-with-past ``graph`` (its inputs are read, not its weights) from the
    documents of ``data``: each document's first ``max_length`` tokens, with an empty cache of the graph's
    own shape; and the text column read."""
    import numpy as np

    from edgekit import lm_eval
    from edgekit.checkpoint import load_tokenizer

    docs, column = lm_eval.read_documents(data, text_column, limit, flag=flag)
    tok = load_tokenizer(folder)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    past = {}
    for i in graph.input:
        if i.name.startswith("past_key_values."):
            dims = [d.dim_value for d in i.type.tensor_type.shape.dim]
            past[i.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
    feeds = []
    for d in docs:
        ids = np.asarray([(bos + tok(d, add_special_tokens=False)["input_ids"])[:max_length]], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids),
                      "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **past})
    return feeds, column


def _calibration_feeds(model, src: Path, cfg: QuantizeConfig) -> tuple[list, dict]:
    if not cfg.calibration_data:
        raise EdgekitError("--method awq needs calibration text", "pass --calibration-data FILE (training text, not "
                           "the evaluation set)")
    feeds, column = prefill_feeds(model.graph, src.parent, cfg.calibration_data, cfg.text_column,
                                  cfg.calibration_samples, cfg.max_length, "--calibration-data")
    return feeds, {"source": str(Path(cfg.calibration_data).resolve()), "samples": len(feeds), "method": "awq",
                   "text_column": column, "max_length": cfg.max_length}


def _nncf_awq(model, src: Path, cfg: QuantizeConfig, skip: list, progress: Progress):
    """NNCF's compress_weights (INT4 asymmetric, AWQ and scale estimation on the calibration text) over the
    MatMuls not in ``skip``; then its MatMulNBits nodes are made what this onnxruntime loads and runs fast."""
    try:
        import nncf
    except ImportError:
        from edgekit.errors import MissingExtra

        raise MissingExtra("nncf", "nncf") from None
    feeds, calibration = _calibration_feeds(model, src, cfg)
    input_names = {i.name for i in model.graph.input}
    feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
    with progress.step(f"AWQ and scale estimation (NNCF) on {len(feeds)} calibration texts"):
        model = nncf.compress_weights(
            model, mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=1.0, group_size=cfg.block_size, all_layers=True,
            dataset=nncf.Dataset(feeds), awq=True, scale_estimation=True,
            ignored_scope=nncf.IgnoredScope(names=skip, types=["Gather"], validate=False))
    _onnxruntime_matmulnbits(model, cfg.accuracy_level)
    return model, calibration


def _onnxruntime_matmulnbits(model, accuracy_level: int) -> None:
    """NNCF 3.4 writes MatMulNBits zero points one byte per block, which onnxruntime 1.32 refuses ("zero_points
    initializer shape ... does not match"): they are packed two 4-bit values to a byte, low nibble first, as
    onnxruntime's own quantizer writes them; and ``accuracy_level`` is set (NNCF leaves 0, the slow path)."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a for a in n.attribute}
        if "accuracy_level" in attrs:
            attrs["accuracy_level"].i = accuracy_level
        else:
            n.attribute.append(helper.make_attribute("accuracy_level", accuracy_level))
        a = {k: helper.get_attribute_value(v) for k, v in attrs.items()}
        if len(n.input) < 4 or not n.input[3] or n.input[3] not in inits or a.get("bits", 4) != 4:
            continue
        zp = numpy_helper.to_array(inits[n.input[3]])
        blocks = -(-a["K"] // a["block_size"])
        if zp.dtype != np.uint8 or zp.shape != (a["N"], blocks) or blocks == 1:
            continue  # already packed (or one block: one byte either way)
        z = np.pad(zp, ((0, 0), (0, blocks % 2))) & 0x0F
        inits[n.input[3]].CopyFrom(numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8),
                                                           n.input[3]))


def _weight_only(src: Path, dst_folder: Path, cfg: QuantizeConfig, meta: dict, task: str, output_names: list,
                 progress: Progress, recorded_source, t0: float) -> QuantizeReport:
    """``--bits 4``: weight-only block-wise INT4 with onnxruntime's MatMulNBitsQuantizer (round to nearest), the
    lm_head at ``cfg.lm_head`` bits, ``exclude_nodes`` in float; activations stay float (MatMulNBits computes
    in int8 on CPUs with accuracy_level 4)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if cfg.block_size & (cfg.block_size - 1):
        raise EdgekitError(f"--block-size {cfg.block_size} is not a power of two", "use 16, 32, 64, 128 or 256")
    model = onnx.load(str(src))
    rewritten = _gemm_to_matmul(model) + _fold_weight_transposes(model)
    names = {n.name for n in model.graph.node}
    unknown = [n for n in cfg.exclude_nodes if n not in names]
    if unknown:
        raise EdgekitError(f"--exclude-nodes names {', '.join(unknown)}, not in the graph (its nodes are named like "
                           f"{', '.join(sorted(names)[:3])})", "list the graph's node names with Netron or onnx")
    head = _classifier_nodes(src, output_names[0]) if task == "text-generation" else []
    keep = list(cfg.exclude_nodes) + (head if cfg.lm_head != "4" else [])
    common = {"block_size": cfg.block_size, "is_symmetric": False, "accuracy_level": cfg.accuracy_level or None}
    calibration = None
    ops = ("MatMul", "Gather") if cfg.embeddings == "4" else ("MatMul",)
    if cfg.method == "awq":
        # the body's MatMuls by NNCF (data-aware); left for onnxruntime, as in RTN: the embeddings, and the
        # lm_head when it is 4-bit (every other MatMul is NNCF's or kept in float)
        model, calibration = _nncf_awq(model, src, cfg, keep + head, progress)
        ops = ("Gather",) * (cfg.embeddings == "4") + ("MatMul",) * (cfg.lm_head == "4")
        keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in head]
    with progress.step(f"Quantizing weights to INT4 (MatMulNBits, blocks of {cfg.block_size})"):
        if ops:
            q = MatMulNBitsQuantizer(model, bits=4, nodes_to_exclude=keep, op_types_to_quantize=ops,
                                     quant_axes=(("MatMul", 0), ("Gather", 1)), **common)
            q.process()
            model = q.model.model
        if head and cfg.lm_head == "8":
            q = MatMulNBitsQuantizer(model, bits=8, nodes_to_include=head, **common)
            q.process()
            model = q.model.model
    out = dst_folder / ONNX_NAME
    big = model.ByteSize() > 1_800_000_000  # protobuf's 2 GB limit: the weights go beside the graph
    onnx.save_model(model, str(out), save_as_external_data=big, location=ONNX_NAME + "_data" if big else None)
    _copy_side_files(src, dst_folder)
    n_quant, in_float, float_ops = _analyse(out)
    quantized_from = _write_meta(src, dst_folder, cfg, meta, task, recorded_source)
    bits = weight_bits(out)
    return QuantizeReport(quantized_from, "", f"weight-only int4 ({cfg.method})", folder_size(src), folder_size(out),
                          {}, n_quant, in_float, float_ops, calibration, time.perf_counter() - t0,
                          {**cfg.to_dict(), "lm_head_nodes": head, "gemm_rewritten_as_matmul": rewritten},
                          weight_bits={k: v for k, v in bits.items()})
