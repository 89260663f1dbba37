"""Quantize stage: ONNX FP32 -> INT8 through ``onnxruntime.quantization`` (``int8.py``), or weight-only INT4
for decoder LMs (``int4.py``); this module holds the stage's config, report and the stage function.

Dynamic mode first fuses the transformer graph with onnxruntime's optimizer (Attention, SkipLayerNorm,
BiasGelu, EmbedLayerNorm) where the family supports it: measured here that is what makes INT8 faster than
Optimum's plain dynamic preset. Static mode writes a QDQ graph calibrated on the user's data, quantizing
only the matmuls by default (Softmax, LayerNorm, residual Adds and the classifier stay in float) because
quantizing everything was measured to cost 22 accuracy points on a 77-class task.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from pydantic import field_validator, model_validator

from edgekit.version import __version__
from edgekit.artifacts import ONNX_FILE_SUFFIXES, copy_side_file, model_size, scratch_dir
from edgekit.compress.int4 import (apply_importance, calibration_feeds, float_matmul_weights, importance, nncf_awq,
                                   weight_bits)
# default_reduce_range is the stage's answer to `reduce_range: null`, which compress and search record
from edgekit.compress.int8 import (default_reduce_range, graph_classifier_nodes, open_source, prepare_graph,  # noqa: F401
                                   quantize_prepared, quantizer_plan)
from edgekit.compress.rewrites import (MERGED_NAME_SEPARATOR, fold_weight_transposes, fuse_sibling_matmulnbits,
                                       gemm_to_matmul)
from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option
from edgekit.progress import Progress
from edgekit.reports import RenderedReport, SCHEMA_VERSION, Section, fmt_mib, fmt_ratio
from edgekit.runtimes.base import ARTIFACT_FILE, ONNX_NAME

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
    def _per_channel_nodes(self):
        if not self.per_channel_nodes:
            return self
        if not self.dynamic_int8:
            raise EdgekitError("--per-channel-nodes applies to dynamic INT8 only",
                               "drop --per-channel-nodes, or use --mode dynamic")
        if self.per_channel:
            raise EdgekitError("--per-channel-nodes names nodes to give per-channel scales in a per-tensor model, "
                               "but every node is per-channel already", "add --per-tensor, or drop --per-channel-nodes")
        both = [n for n in self.per_channel_nodes if n in self.exclude_nodes]
        if both:
            raise EdgekitError(f"{', '.join(both)} {'is' if len(both) == 1 else 'are'} both kept in float "
                               "(--exclude-nodes) and quantized per channel (--per-channel-nodes)",
                               "name each node in one of the two options")
        return self

    @property
    def dynamic_int8(self) -> bool:
        """Dynamic INT8: the one mode where single nodes can take per-channel scales (``per_channel_nodes``)."""
        return self.mode == "dynamic" and self.bits == 8

    @model_validator(mode="after")
    def _method_is_int4(self):
        if self.method != "rtn" and self.bits != 4:
            raise EdgekitError(f"--method {self.method} chooses how INT4 weights are rounded, and this run is "
                               f"--bits {self.bits}", "add --bits 4, or drop --method")
        return self

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
    # Mixed granularity: where one node of a per-tensor model breaks the gate, per-channel scales for that node
    # alone can mend it at almost no cost (a second quantize_dynamic pass over just those nodes); keeping it in
    # float costs its whole INT8 speed-up (README, "Recipe search").
    per_channel_nodes: list[str] = option(help="Dynamic, --per-tensor: node name quantized with per-channel weight "
                                               "scales instead (repeat, or comma-separate).", default_factory=list)
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
    # Zero points per block (asymmetric) by default: a block's range need not be centred on 0. Symmetric blocks
    # are what onnxruntime-genai's builder writes: no zero points to read or apply (SmolLM2-135M shape, this CPU:
    # 4 of 104 MB per token less to read, decode ~3% faster), at a little more rounding error.
    symmetric: bool = option(False, "--bits 4: symmetric blocks, without zero points (as onnxruntime-genai's "
                                    "builder writes INT4).")
    # Two data-aware methods, both on --calibration-data: NNCF's compress_weights (AWQ + scale estimation, ONNX
    # backend), and imatrix (each block's scale searched against the calibration activations' mean squares;
    # compress.int4). On the TinyStories model imatrix at blocks of 32 agreed with the original more than
    # round to nearest and the builder, and AWQ less (README). rtn needs no data.
    method: Literal["rtn", "awq", "imatrix"] = option(
        "rtn", "--bits 4: rtn (round to nearest), awq (NNCF's AWQ and scale estimation) or imatrix (block scales "
               "searched against the importance of each input channel); awq and imatrix read --calibration-data.")


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
        finer = (d.get("config") or {}).get("per_channel_nodes")
        if finer:
            notes.append("Per-channel weight scales (the rest per-tensor): " + ", ".join(f"`{n}`" for n in finer) + ".")
        if d.get("calibration"):
            c = d["calibration"]
            notes.append(f"Calibrated ({c.get('method')}) on {c.get('samples')} examples from `{c.get('source')}`.")
            if c.get("searched_matrices"):
                r = c.get("weighted_error_vs_rtn") or {}
                notes.append(f"Block scales of {c['searched_matrices']} weight matrices searched against the "
                             f"importance of their input channels: weighted rounding error {r.get('median', 1):.2f}x round to "
                             f"nearest's (median; at most {r.get('max', 1):.2f}x).")
            if c.get("smaller_blocks"):
                sizes = sorted(set(c["smaller_blocks"].values()))
                notes.append(f"{len(c['smaller_blocks'])} weight matrices in blocks of {', '.join(map(str, sizes))}: "
                             "the block size given does not divide their input size.")
        wb = d.get("weight_bits")
        if wb:
            notes.append("Weight MatMuls: " + ", ".join(f"{len(v)} at {k} bits" if k != "float" else f"{len(v)} in float"
                                                        for k, v in wb.items() if v) + ".")
        merged = (d.get("config") or {}).get("fused_matmuls")
        if merged:
            notes.append(f"{len(merged)} groups of MatMulNBits reading one input merged into one each (weights stacked "
                         f"along N, then a Split; the same values): " + ", ".join(f"`{MERGED_NAME_SEPARATOR.join(g)}`" for g in merged[:2])
                         + (", …" if len(merged) > 2 else "") + ".")
        form = ", qoperator" if (d.get("config") or {}).get("format") == "qoperator" else ""
        title = f"Quantize ({d.get('mode')})" if wb else f"Quantize ({d.get('mode')} INT8{form})"
        return [Section(title, ["model", "size before (MiB)", "size after (MiB)",
                                                              "smaller by", "quantized nodes", "compute nodes in float"],
                        [row], notes=notes)]


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
    return QuantizeReport(quantized_from, "", cfg.mode, model_size(src), model_size(out), prepared.fused, n_quant,
                          in_float, float_ops, calibration, time.perf_counter() - t0,
                          {**cfg.to_dict(), "per_channel": cfg.per_channel, "optimize": prepared.optimize,
                           "reduce_range": plan.kwargs["reduce_range"], "exclude_op_types_not_quantizable": bad_types})


def _copy_side_files(src: Path, dst_folder: Path) -> None:
    """Config, tokenizer and the like beside the model; not the model, its external data or stage reports."""
    for f in src.parent.iterdir():
        if f.is_file() and not f.name.endswith(ONNX_FILE_SUFFIXES) and \
                f.name not in (ARTIFACT_FILE, "export_report.json", "quantize_report.json"):
            copy_side_file(f, dst_folder / f.name)


def _write_meta(src: Path, dst_folder: Path, cfg: QuantizeConfig, meta: dict, task: str, recorded_source) -> str:
    quantized_from = str(recorded_source or src)
    (dst_folder / ARTIFACT_FILE).write_text(json.dumps({
        "edgekit_version": __version__, "stage": "quantize", "task": task, "mode": cfg.mode, "bits": cfg.bits,
        "source": meta.get("source", quantized_from), "quantized_from": quantized_from,
        **({"kv_cache": True} if meta.get("kv_cache") else {}),
    }, indent=2))
    return quantized_from


WEIGHTS_FILE = ONNX_NAME + "_data"


def save_weights_beside(model, out: Path) -> None:
    """Save ``model`` with its weights (every tensor over 1 KiB) in ``model.onnx_data`` beside the graph, as
    optimum names it. onnxruntime memory-maps external weights on a CPU instead of reading them onto the heap
    through the parsed protobuf, and MatMulNBits copies what it needs into its packed layout: measured on the
    SmolLM2-135M architecture at INT4, peak RSS 288 -> 228 MB and load time 0.57 -> 0.23 s (the graph's nodes and
    outputs are the same). Readable by everyone (onnx creates the file 0600)."""
    import onnx

    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=WEIGHTS_FILE, size_threshold=1024)
    data = out.with_name(WEIGHTS_FILE)
    if data.is_file():
        data.chmod(0o644)


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
    # the lm_head as the source file names it, before the rewrites below
    head = graph_classifier_nodes(model.graph, output_names[0]) if task == "text-generation" else []
    rewritten = gemm_to_matmul(model) + fold_weight_transposes(model)
    names = {n.name for n in model.graph.node}
    unknown = [n for n in cfg.exclude_nodes if n not in names]
    if unknown:
        raise EdgekitError(f"--exclude-nodes names {', '.join(unknown)}, not in the graph (its nodes are named like "
                           f"{', '.join(sorted(names)[:3])})", "list the graph's node names with Netron or onnx")
    keep = list(cfg.exclude_nodes) + (head if cfg.lm_head != "4" else [])
    common = {"block_size": cfg.block_size, "is_symmetric": cfg.symmetric, "accuracy_level": cfg.accuracy_level or None}
    calibration = None
    ops = ("MatMul", "Gather") if cfg.embeddings == "4" else ("MatMul",)
    if cfg.method == "awq":
        # the body's MatMuls by NNCF (data-aware); left for onnxruntime, as in RTN: the embeddings, and the
        # lm_head when it is 4-bit (every other MatMul is NNCF's or kept in float)
        model, calibration = nncf_awq(model, src, cfg, keep + head, progress)
        ops = ("Gather",) * (cfg.embeddings == "4") + ("MatMul",) * (cfg.lm_head == "4")
        keep = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in head]
    elif cfg.method == "imatrix":
        # onnxruntime's round to nearest first, then each 4-bit block's scale searched against the importance of
        # its input channels on the calibration text (int4.apply_importance); the float weights are kept for it
        from onnx import numpy_helper

        feeds, calibration = calibration_feeds(model, src, cfg)
        kept = set(keep)
        excluded = {n.output[0] for n in model.graph.node if n.name in kept}
        originals = {o: aw for o, aw in float_matmul_weights(model).items() if o not in excluded}
        with progress.step(f"Measuring input importance on {len(feeds)} calibration texts"):
            imp = importance(model, feeds, sorted({a for a, _ in originals.values()}))
        weights = {i.name: i for i in model.graph.initializer}
        floats = {w: numpy_helper.to_array(weights[w]) for _, w in originals.values()}
    with progress.step(f"Quantizing weights to INT4 (MatMulNBits, blocks of {cfg.block_size})"):
        if ops:
            q = MatMulNBitsQuantizer(model, bits=4, nodes_to_exclude=keep, op_types_to_quantize=ops,
                                     quant_axes=(("MatMul", 0), ("Gather", 1)), **common)
            q.process()
            model = q.model.model
    if cfg.method == "imatrix":
        calibration.update(apply_importance(model, originals, floats, imp, progress))
        del floats
    head8 = ", the lm_head to 8 bits" if head and cfg.lm_head == "8" else ""
    with progress.step(f"Merging sibling MatMulNBits{head8}"):
        if head and cfg.lm_head == "8":
            q = MatMulNBitsQuantizer(model, bits=8, nodes_to_include=head, **common)
            q.process()
            model = q.model.model
        fused = fuse_sibling_matmulnbits(model)
    out = dst_folder / ONNX_NAME
    save_weights_beside(model, out)
    _copy_side_files(src, dst_folder)
    n_quant, in_float, float_ops = _analyse(out)
    quantized_from = _write_meta(src, dst_folder, cfg, meta, task, recorded_source)
    bits = weight_bits(out)
    return QuantizeReport(quantized_from, "", f"weight-only int4 ({cfg.method})", model_size(src), model_size(out),
                          {}, n_quant, in_float, float_ops, calibration, time.perf_counter() - t0,
                          {**cfg.to_dict(), "lm_head_nodes": head, "gemm_rewritten_as_matmul": rewritten,
                           "fused_matmuls": fused},
                          weight_bits={k: v for k, v in bits.items()})
