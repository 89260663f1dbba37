"""INT8 with onnxruntime's quantizers: the FP32 graph opened and checked, prepared (fused, shape-inferred for
calibration), and quantized dynamically or statically (QDQ or QOperator) by one plan.

``quantize_onnx`` (the stage) and culprit ranking (one node at a time) both go through :func:`prepare_graph`
and :func:`quantizer_plan`, so a node name the ranking reports is one ``exclude_nodes`` accepts and every node
is quantized the same way in both. The config is read by its fields only (``QuantizeConfig`` lives in
``edgekit.compress.quantize``, which imports this module).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.progress import Progress
from edgekit.runtimes.base import onnx_file, read_artifact_meta

MODES = ("dynamic", "static")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


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


def classifier_nodes(model_path: Path, output_name: str) -> list[str]:
    """The last compute node before the logits: kept in float in static mode (small, accuracy-critical)."""
    import onnx

    return graph_classifier_nodes(onnx.load(str(model_path), load_external_data=False).graph, output_name)


def graph_classifier_nodes(graph, output_name: str) -> list[str]:
    """classifier_nodes of a graph already in memory."""
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


def _calibration_batches(folder: Path, cfg, input_names: list[str], task: str):
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


def prepare_graph(source: SourceModel, cfg, scratch: Path, progress: Progress) -> PreparedGraph:
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
    if source.task == "text-generation" and not static:
        with progress.step("Giving the tied lm_head its own weight"):
            work = materialize_transposed_weights(work, scratch) or work
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
    for flag, listed in (("--exclude-nodes", cfg.exclude_nodes), ("--per-channel-nodes", cfg.per_channel_nodes)):
        _check_names(flag, listed, names, optimize)
    return PreparedGraph(source, work, optimize, fused)


def materialize_transposed_weights(path: Path, scratch: Path) -> Path | None:
    """A copy of the graph at ``path`` in ``scratch`` with its weights computed as the Transpose of an initializer
    made initializers of their own (``rewrites.fold_weight_transposes``, which INT4 runs too); None where there are none.

    A decoder whose lm_head is tied to its embeddings is exported with ``MatMul(h, Transpose(embed_tokens))``.
    onnxruntime folds that Transpose at load time in FP32, but once the quantizer has quantized the embedding's
    Gather, the lm_head reads the quantized embedding through a DequantizeLinear, which onnxruntime never folds:
    every decode step dequantized the whole embedding and ran the lm_head in FP32 (SmolLM2-135M: 16 of 33 ms
    a token, profiled). With its own weight, the lm_head is a MatMul the quantizer makes an integer one; the
    cost is the weight stored twice, as the FP32 session already held it."""
    import onnx

    from edgekit.compress.rewrites import fold_weight_transposes

    model = onnx.load(str(path))
    if not fold_weight_transposes(model):
        return None
    out = scratch / "untied.onnx"
    # weights beside the graph: a 0.5B model's FP32 weights, stored twice, pass protobuf's 2 GB limit
    onnx.save(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
              location=out.name + ".data", size_threshold=1024)
    return out


def _check_names(flag: str, listed: list, names: set, optimize: bool) -> None:
    unknown = [n for n in listed if n not in names]
    if unknown:
        raise EdgekitError(
            f"{flag} names {', '.join(unknown)}, which {'is' if len(unknown) == 1 else 'are'} not in the "
            f"{'fused ' if optimize else ''}graph (its nodes are named like {', '.join(sorted(names)[:3])})",
            "list the graph's node names with Netron or onnx, or pass --no-optimize to use the exported names",
        )


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
    # Dynamic mode: nodes quantized in a second pass with per-channel weight scales (QuantizeConfig.per_channel_nodes)
    per_channel_nodes: list = field(default_factory=list)

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
            fine = [n for n in self.per_channel_nodes if not nodes or n in nodes]
            if fine:
                self._mixed_dynamic(model_in, out, nodes, fine)
            else:
                quantize_dynamic(model_in, str(out), **self.kwargs, **only)
        if self.attention:
            first = out.with_name(out.stem + ".matmuls.onnx")
            out.replace(first)
            quantize_dynamic(str(first), str(out), **self.attention, **only)
            first.unlink()


    def _mixed_dynamic(self, model_in, out: Path, nodes: list | None, fine: list) -> None:
        """Dynamic INT8 with ``fine`` per channel: onnxruntime's quantizer takes one granularity per call, so the
        other nodes (all, or those of ``nodes``) first with the fine ones excluded, then a second call over the
        fine ones alone on the first call's output."""
        from onnxruntime.quantization import quantize_dynamic

        coarse = [n for n in nodes if n not in fine] if nodes else None  # None: every node but the fine ones
        first = out.with_name(out.stem + ".coarse.onnx")
        if coarse == []:
            shutil.copyfile(model_in, first)
        else:
            quantize_dynamic(model_in, str(first), **{**self.kwargs, "nodes_to_exclude": [
                *self.kwargs["nodes_to_exclude"], *fine]}, **({"nodes_to_quantize": coarse} if coarse else {}))
        quantize_dynamic(str(first), str(out), **{**self.kwargs, "per_channel": True}, nodes_to_quantize=fine)
        first.unlink()


def quantizer_plan(prepared: PreparedGraph, cfg) -> QuantizerPlan:
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
                                                                         if o not in cfg.exclude_op_types]}, registry,
                             per_channel_nodes=list(cfg.per_channel_nodes))
    qoperator = cfg.format == "qoperator"
    registry = set(QLinearOpsRegistry if qoperator else QDQRegistry)
    attention = None
    if qoperator and prepared.fused.get("Attention") and "Attention" not in cfg.exclude_op_types:
        attention, registry = {**dynamic, "op_types_to_quantize": ["Attention"]}, registry | {"Attention"}
    source = prepared.source
    head = classifier_nodes(prepared.path, source.output_names[0]) * (source.task != "feature-extraction")
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


def quantize_prepared(prepared: PreparedGraph, plan: QuantizerPlan, cfg, out: Path,
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
