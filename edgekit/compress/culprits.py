"""Culprit ranking: which quantized node is to blame when an INT8 model misses the accuracy gate.

For every node a :class:`QuantizeConfig` quantizes, the FP32 graph with only that node quantized is scored
against the FP32 graph's own outputs (its isolated contribution), worst first; the names are those of the graph
quantize_onnx quantizes (fused when ``optimize`` is on: :func:`prepare_graph`), so the worst can be handed
straight back as ``QuantizeConfig(exclude_nodes=[...])``.

How a node is quantized alone: it is cut out as a one-node model, quantized by the same
:class:`QuantizerPlan` quantize_onnx uses (``nodes_to_quantize=[name]``, the same per-channel, reduce-range and
format options), and its replacement is spliced into the FP32 graph in place of the node. Measured on
all-MiniLM-L6-v2 (2 cores): running the quantizer over the whole graph for one node takes 1.4-1.6 s (shape
inference, every weight saved), the one-node model 0.065 s, for the same replacement.

Static mode calibrates once, through the very quantize_static call quantize_onnx makes, with onnxruntime's
calibration cache (``calibration_cache_path``) switched on; every one-node quantization then reads its ranges
from that cache instead of calibrating. So each node gets the scales it has in the shipped model, and only
public onnxruntime calls are made (create_calibrator's TensorsData would have to reach the quantizer through
its private classes; qdq_loss_debug compares activations of one whole QDQ model, not one node at a time).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.compress.int4 import prefill_feeds
from edgekit.compress.int8 import encoded_examples, open_source, prepare_graph, quantize_prepared, quantizer_plan
from edgekit.compress.quantize import QUANTIZED_OPS, QuantizeConfig
from edgekit.errors import EdgekitError
from edgekit.lm_eval import log_softmax
from edgekit.progress import Progress
from edgekit.reports import RenderedReport, SCHEMA_VERSION, Section, fmt_num

# Encoder blocks as the exporters name them: BERT (/bert/encoder/layer.3/), DistilBERT (/transformer/layer.3/),
# Llama-style decoders (/model/layers.3/), GPT-2 (/transformer/h.3/).
_LAYER = re.compile(r"(?:^|/)(?:layer|layers|h|block|blocks)\.(\d+)(?:/|$)")
SHOWN = 10  # culprits in the terminal table (the JSON and Markdown carry all)

DISTANCES = {
    "text-classification": "mean KL(FP32 || INT8) of the class probabilities per example",
    "regression": "RMSE of the output divided by the FP32 outputs' standard deviation",
    "token-classification": "mean KL(FP32 || INT8) of the label probabilities per real token",
    "feature-extraction": "1 - mean cosine of the mean-pooled embeddings",
    "text-generation": "mean KL(FP32 || INT8) of the next-token probabilities over the prefill",
}


@dataclass
class CulpritRanking(RenderedReport):
    source: str  # the FP32 ONNX folder
    task: str
    distance: str  # what ``error`` measures (DISTANCES)
    samples: int
    data: str
    seconds: float
    config: dict  # the QuantizeConfig that missed the gate
    nodes: list  # {"name", "op_type", "layer", "error", "top1_flips"}, worst first
    layers: list  # {"layer", "nodes", "error" (sum of its nodes'), "worst"}, worst first
    full: dict  # the whole INT8 model on the same samples: {"error", "top1_flips"}
    timings: dict = field(default_factory=dict)  # seconds: prepare (fuse, calibrate, quantize all), nodes
    schema_version: int = SCHEMA_VERSION

    @property
    def worst(self) -> str | None:
        return self.nodes[0]["name"] if self.nodes else None

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        nodes = d.get("nodes") or []
        flips = any(n.get("top1_flips") is not None for n in nodes)
        headers = ["rank", "node", "op", "layer", "error"] + ["top-1 flips"] * flips
        rows = [[str(i + 1), n["name"], n["op_type"], fmt_num(n.get("layer")), f"{n['error']:.4g}"]
                + [fmt_num(n.get("top1_flips"))] * flips for i, n in enumerate(nodes if wide else nodes[:SHOWN])]
        full = d.get("full") or {}
        notes = [f"Error: {d.get('distance')}, on {d.get('samples')} examples of `{d.get('data')}`, each node "
                 f"quantized alone in the FP32 graph."]
        if full.get("error") is not None:
            notes.append(f"The whole INT8 model: error {full['error']:.4g}"
                         + (f", {full['top1_flips']} top-1 flips." if full.get("top1_flips") is not None else "."))
        if nodes:
            notes.append(f"Keep the worst in float with `--exclude-nodes {nodes[0]['name']}`.")
        if not wide and len(nodes) > SHOWN:
            notes.append(f"{len(nodes) - SHOWN} more nodes in the JSON and Markdown reports.")
        title = f"Culprits ({d.get('task')}, {len(nodes)} quantized nodes, {fmt_num(d.get('seconds'), 3)} s)"
        out = [Section(title, headers, rows, notes=notes, align="rllrr" + "r" * flips)]
        layers = d.get("layers") or []
        if layers:
            out.append(Section("By layer", ["layer", "nodes", "error (sum)", "worst node"],
                               [[fmt_num(x["layer"]), str(x["nodes"]), f"{x['error']:.4g}", x["worst"]] for x in layers],
                               align="rrrl", level=3))
        return out


def layer_of(node) -> int | None:
    """The encoder/decoder block a node belongs to, from its name, else from its outputs' names (a fused
    ``Attention_3`` writes ``/encoder/layer.3/attention/...``)."""
    for name in (node.name, *node.output):
        m = _LAYER.search(name)
        if m:
            return int(m.group(1))
    return None


def rank_culprits(onnx_folder, config: QuantizeConfig, data, *, task=None, text_column=None, samples: int = 64,
                  progress=None) -> CulpritRanking:
    """Rank the nodes ``config`` quantizes in the FP32 ONNX model of ``onnx_folder`` by how far quantizing each
    one alone moves the model's output on ``samples`` texts of ``data``, worst first."""
    import onnx

    from edgekit.artifacts import scratch_dir

    progress = progress or Progress()
    t0 = time.perf_counter()
    if config.bits != 8:
        raise EdgekitError("culprit ranking covers INT8 (--bits 8) only", "rank an INT8 config")
    if samples < 1:
        raise EdgekitError(f"samples must be at least 1, not {samples}", "score on a few dozen examples")
    from edgekit.tasks import get_task

    source = open_source(Path(onnx_folder))
    task = get_task(task or source.task).name
    if config.mode == "static":
        _require_calibration_cache()
    with scratch_dir("edgekit-culprits-") as tmp:
        tmp = Path(tmp)
        prepared = prepare_graph(source, config, tmp, progress)
        plan = quantizer_plan(prepared, config)
        cache = tmp / "ranges.json" if plan.static else None
        quantize_prepared(prepared, plan, config, tmp / "int8.onnx", progress, calibration_cache=cache)
        model = onnx.load(str(prepared.path))
        # The weights go to one file beside the graphs written below and the in-memory graph keeps references
        # to it: writing a spliced graph then takes milliseconds instead of serialising every weight per node.
        onnx.save_model(model, str(tmp / "fp32.onnx"), save_as_external_data=True, location="fp32.onnx.data")
        feeds, data_source = _feeds(model, source, task, data, text_column or config.text_column, samples,
                                    config.max_length)
        output = "logits" if "logits" in source.output_names else source.output_names[0]
        scorer = _Scorer(task, output, feeds)
        with progress.step(f"Scoring the FP32 and INT8 models on {len(feeds)} examples"):
            scorer.reference(tmp / "fp32.onnx")
            full_error, full_flips = scorer.score(tmp / "int8.onnx")
        prepared_s = time.perf_counter() - t0
        candidates = [n for n in model.graph.node if n.op_type in plan.op_types
                      and n.name not in plan.kwargs["nodes_to_exclude"]]
        ranked = []
        with progress.step(f"Quantizing {len(candidates)} nodes one at a time", total=len(candidates)) as step:
            for node in candidates:
                replacement = _quantized_alone(model, node, plan, tmp, cache)
                if replacement is not None:
                    with _spliced(model, node, replacement):
                        onnx.save_model(model, str(tmp / "spliced.onnx"))
                    error, flips = scorer.score(tmp / "spliced.onnx")
                    ranked.append({"name": node.name, "op_type": node.op_type, "layer": layer_of(node),
                                   "error": error, "top1_flips": flips})
                step.advance()
    ranked.sort(key=lambda n: -n["error"])
    return CulpritRanking(str(source.path.parent), task, DISTANCES[scorer.kind], len(feeds), data_source,
                          time.perf_counter() - t0, config.to_dict(), ranked, _by_layer(ranked),
                          {"error": full_error, "top1_flips": full_flips},
                          {"prepare": prepared_s, "nodes": time.perf_counter() - t0 - prepared_s})


def _require_calibration_cache() -> None:
    import inspect

    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise EdgekitError(f"ranking static INT8 nodes needs onnxruntime's calibration cache, which onnxruntime "
                           f"{ort.__version__} does not have", "upgrade onnxruntime (1.32 or later)")


def _feeds(model, source, task: str, data, text_column, samples: int, max_length: int) -> tuple[list, str]:
    if task == "text-generation":
        feeds, _ = prefill_feeds(model.graph, source.path.parent, data, text_column, samples, max_length, "--data")
        return feeds, str(Path(data).resolve())
    return encoded_examples(source.path.parent, data, task, text_column, samples, max_length, source.input_names,
                            "--data")


def _by_layer(ranked: list) -> list:
    layers = {}
    for n in ranked:  # worst first, so the first node seen of a layer is its worst
        if n["layer"] is not None:
            x = layers.setdefault(n["layer"], {"layer": n["layer"], "nodes": 0, "error": 0.0, "worst": n["name"]})
            x["nodes"] += 1
            x["error"] += n["error"]
    return sorted(layers.values(), key=lambda x: -x["error"])


def _one_node_model(model, node, folder: Path):
    """``node`` alone, with its weights (read from ``folder``, where the graph keeps them). The tensor types are
    what the graph records, else float: the quantizer only asks whether a tensor is float, and this model is
    never run."""
    import onnx
    from onnx import helper, numpy_helper

    inits = {i.name: numpy_helper.from_array(numpy_helper.to_array(i, str(folder)), i.name)
             for i in model.graph.initializer if i.name in node.input}
    known = {v.name: v for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}

    def info(name):
        return known[name] if name in known else helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)

    graph = helper.make_graph([node], "one_node", [info(x) for x in dict.fromkeys(node.input) if x and x not in inits],
                              [info(x) for x in node.output if x], [inits[x] for x in dict.fromkeys(node.input) if x in inits])
    one = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    one.metadata_props.extend(model.metadata_props)  # e.g. that quant_pre_process ran
    return one


def _quantized_alone(model, node, plan, tmp: Path, cache: Path | None):
    """The quantizer's replacement of ``node`` (a one-node model), or None where it leaves the node as it is."""
    import onnx

    out = tmp / "one_node.onnx"
    plan.run(_one_node_model(model, node, tmp), out, nodes=[node.name], calibration_cache=cache)
    quantized = onnx.load(str(out))
    ops = [n.op_type for n in quantized.graph.node]
    if ops == [node.op_type]:
        return None
    produced = {o for n in quantized.graph.node for o in n.output}
    missing = [o for o in node.output if o and o not in produced]
    if missing or not set(ops) & (QUANTIZED_OPS | {"DequantizeLinear"}):
        raise RuntimeError(f"the quantizer's replacement of {node.name} ({ops}) does not produce {missing}")
    return quantized


class _spliced:
    """``model`` with ``node`` replaced by the quantized one-node model, for the duration of a ``with``: the
    graph is changed in place and restored (a copy of every weight per node is what this avoids)."""

    def __init__(self, model, node, quantized):
        self.model, self.node, self.q = model, node, quantized

    def __enter__(self):
        g = self.model.graph
        self.nodes, self.inits = list(g.node), list(g.initializer)
        self.opsets = [(o.domain, o.version) for o in self.model.opset_import]
        at = next(i for i, n in enumerate(self.nodes) if n.name == self.node.name)
        # Q/DQ writes a dequantized bias under the float bias's own name: that initializer is replaced, not kept
        produced = {o for n in self.q.graph.node for o in n.output}
        kept = [i for i in self.inits if i.name not in produced]
        have = {i.name for i in kept}
        del g.node[:]
        g.node.extend(self.nodes[:at] + list(self.q.graph.node) + self.nodes[at + 1:])
        del g.initializer[:]
        g.initializer.extend(kept + [i for i in self.q.graph.initializer if i.name not in have])
        versions = dict(self.opsets)
        for o in self.q.opset_import:  # com.microsoft for the quantized contrib ops
            if versions.get(o.domain, -1) < o.version:
                versions[o.domain] = o.version
        _set_opsets(self.model, versions)
        return self.model

    def __exit__(self, *exc):
        g = self.model.graph
        del g.node[:]
        g.node.extend(self.nodes)
        del g.initializer[:]
        g.initializer.extend(self.inits)
        _set_opsets(self.model, dict(self.opsets))
        return False


def _set_opsets(model, versions: dict) -> None:
    from onnx import helper

    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in versions.items())


class _Scorer:
    """Runs a graph on the examples and measures how far its output is from the FP32 graph's.

    KL is taken over each row's TOP_K most likely FP32 classes (or tokens) plus the rest merged into one: exact
    for a classifier, and for a language model's vocabulary it keeps the reference at kilobytes instead of
    gigabytes (64 prefills x 128 positions x 150k tokens) while staying a lower bound of the full KL."""

    def __init__(self, task: str, output: str, feeds: list):
        self.task, self.output, self.feeds = task, output, feeds
        self.kind = task
        self.ref = None

    def _outputs(self, path: Path):
        import onnxruntime as ort

        from edgekit.metrics import mean_pool
        from edgekit.runtimes.ort_runtime import session_options

        so = session_options(None)  # the options the shipped model runs with (spinning off, all optimizations)
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        for f in self.feeds:
            y = sess.run([self.output], f)[0]
            if self.task == "feature-extraction":
                yield mean_pool(y, f["attention_mask"])[0]
            elif self.task == "text-classification":
                yield y.reshape(1, -1)
            else:  # real tokens (batch 1: all of them) x labels or vocabulary
                yield y[0][f["attention_mask"][0] > 0]

    def reference(self, path: Path) -> None:
        ys = list(self._outputs(path))
        if self.task == "text-classification" and ys[0].shape[-1] == 1:
            self.kind = "regression"
        self.ref = ys if self.kind in ("feature-extraction", "regression") else [_top(y) for y in ys]

    def score(self, path: Path) -> tuple[float, int | None]:
        """(error, top-1 flips) of a graph against the reference; flips: None where there is no top-1."""
        from edgekit.metrics import cosine_rows

        got = self._outputs(path)
        if self.kind == "feature-extraction":
            return float(1.0 - cosine_rows(np.stack(self.ref), np.stack(list(got))).mean()), None
        if self.kind == "regression":
            ref, cand = np.concatenate(self.ref).astype(np.float64), np.concatenate(list(got)).astype(np.float64)
            return float(np.sqrt(np.mean((cand - ref) ** 2)) / (ref.std() or 1.0)), None
        kl, rows, flips = 0.0, 0, 0
        for (idx, lp, rest, best), y in zip(self.ref, got):
            lq_all = log_softmax(y)
            lq = np.take_along_axis(lq_all, idx, -1)
            q_rest = np.log1p(-np.minimum(np.exp(lq).sum(-1), 1.0 - 1e-12))
            m = np.isfinite(rest)  # the rest's mass, where the top does not hold every class
            kl += float((np.exp(lp) * (lp - lq)).sum() + (np.exp(rest[m]) * (rest[m] - q_rest[m])).sum())
            rows += len(idx)
            flips += int((best != lq_all.argmax(-1)).sum())
        return kl / max(rows, 1), flips


TOP_K = 64


def _top(y) -> tuple:
    """A row's TOP_K classes: their indices, log-probabilities, the log of the rest's mass, and the top-1."""
    lp = log_softmax(y)
    k = min(TOP_K, lp.shape[-1])
    idx = np.argpartition(-lp, k - 1, axis=-1)[:, :k]
    top = np.take_along_axis(lp, idx, -1)
    with np.errstate(divide="ignore"):
        rest = np.log1p(-np.minimum(np.exp(top).sum(-1), 1.0))  # -inf when the top holds every class
    return idx, top, rest, lp.argmax(-1)
