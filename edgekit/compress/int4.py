"""Weight-only INT4 for decoder LMs (``--bits 4``): onnxruntime's MatMulNBits (round to nearest), NNCF's AWQ
and scale estimation, and block scales searched against the calibration activations' importance (``imatrix``)
as the data-aware methods (the graph rewrites around them are in ``edgekit.compress.rewrites``).
Graph-level functions: the stage itself is ``edgekit.compress.quantize``; the config is read by its fields only.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.compress.rewrites import MERGED_NAME_SEPARATOR
from edgekit.errors import EdgekitError
from edgekit.progress import Progress


def weight_bits(model_path: Path) -> dict:
    """How each weight MatMul (and the embedding Gather) is stored: {"4": [names], "8": [names], "float":
    [names]} (MatMulNBits / GatherBlockQuantized by their ``bits`` attribute; a MatMul, Gemm or Gather reading a
    constant weight matrix as float). A MatMulNBits that merges siblings (``rewrites.fuse_sibling_matmulnbits``)
    counts as the MatMuls it holds, by their own names."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weights = {i.name: i for i in graph.initializer}
    out = {"4": [], "8": [], "float": []}

    def matrix(name: str) -> bool:  # an embedding table, not a small constant index list
        return len(weights[name].dims) == 2 and min(weights[name].dims) > 1
    for n in graph.node:
        if n.op_type in ("MatMulNBits", "GatherBlockQuantized"):
            bits = next((a.i for a in n.attribute if a.name == "bits"), 4)
            out.setdefault(str(bits), []).extend(n.name.split(MERGED_NAME_SEPARATOR))
        elif n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights:
            out["float"].append(n.name)
        elif n.op_type == "Gather" and n.input[0] in weights and matrix(n.input[0]):
            out["float"].append(n.name)
    return out


def prefill_feeds(graph, folder: Path, data, text_column: str | None, limit: int | None, max_length: int,
                  flag: str) -> tuple[list, str]:
    """Prefill inputs for a decoder-with-past ``graph`` (its inputs are read, not its weights) from the
    documents of ``data``: each document's first ``max_length`` tokens, with an empty cache of the graph's
    own shape, each feed holding only the inputs the graph has; and the text column read."""
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
    names = {i.name for i in graph.input}
    feeds = []
    for d in docs:
        ids = np.asarray([(bos + tok(d, add_special_tokens=False)["input_ids"])[:max_length]], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], **past}
        feeds.append({k: v for k, v in feed.items() if k in names})
    return feeds, column


def calibration_feeds(model, src: Path, cfg) -> tuple[list, dict]:
    if not cfg.calibration_data:
        raise EdgekitError(f"--method {cfg.method} needs calibration text", "pass --calibration-data FILE (training "
                           "text, not the evaluation set)")
    feeds, column = prefill_feeds(model.graph, src.parent, cfg.calibration_data, cfg.text_column,
                                  cfg.calibration_samples, cfg.max_length, "--calibration-data")
    return feeds, {"source": str(Path(cfg.calibration_data).resolve()), "samples": len(feeds), "method": cfg.method,
                   "text_column": column, "max_length": cfg.max_length}


def nncf_awq(model, src: Path, cfg, skip: list, progress: Progress):
    """NNCF's compress_weights (INT4, asymmetric unless ``cfg.symmetric``; AWQ and scale estimation on the
    calibration text) over the MatMuls not in ``skip``; then its MatMulNBits nodes are made what this onnxruntime
    loads and runs fast."""
    try:
        import nncf
    except ImportError:
        from edgekit.errors import MissingExtra

        raise MissingExtra("nncf", "nncf") from None
    feeds, calibration = calibration_feeds(model, src, cfg)
    input_names = {i.name for i in model.graph.input}
    feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    with progress.step(f"AWQ and scale estimation (NNCF) on {len(feeds)} calibration texts"):
        mode = nncf.CompressWeightsMode.INT4_SYM if cfg.symmetric else nncf.CompressWeightsMode.INT4_ASYM
        # A matrix whose input size the block size does not divide (SmolLM2's 576 at --block-size 128) gets the
        # largest power of two below it that does (NNCF's ADJUST; by default NNCF refuses the whole model, where
        # onnxruntime's round-to-nearest pads the last block); the report lists those matrices.
        model = nncf.compress_weights(
            model, mode=mode, ratio=1.0, group_size=cfg.block_size, all_layers=True,
            dataset=nncf.Dataset(feeds), awq=True, scale_estimation=True,
            ignored_scope=nncf.IgnoredScope(names=skip, types=["Gather"], validate=False),
            advanced_parameters=AdvancedCompressionParameters(
                group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST))
    _onnxruntime_matmulnbits(model, cfg.accuracy_level)
    from onnx import helper

    calibration["smaller_blocks"] = {
        n.name: size for n in model.graph.node if n.op_type == "MatMulNBits"
        for size in [next(helper.get_attribute_value(a) for a in n.attribute if a.name == "block_size")]
        if size != cfg.block_size}
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
        inits[n.input[3]].CopyFrom(numpy_helper.from_array(_pack(zp & 0x0F), n.input[3]))


# --method imatrix. Written here because no library at hand does it for onnxruntime's MatMulNBits: a block's scale
# chosen to minimise the rounding error weighted by how strongly the calibration activations drive each input
# channel (the mean square of that channel: llama.cpp's "importance matrix"), where round to nearest takes the
# block's largest weight as its scale whatever the inputs. NNCF's scale estimation, the nearest library method,
# measured below round to nearest on the TinyStories model (README); onnxruntime's own k_quant weighs by the
# weights' magnitude only, writes zero points always, and fails to pack an odd number of blocks per column
# (onnxruntime 1.32). The search keeps onnxruntime's round-to-nearest scale when no other is better, so a
# matrix's weighted error never rises above it; the nodes, layout and names stay onnxruntime's.
# Scale factors tried, relative to the round-to-nearest scale (1.0: itself, first); each one is also refitted
# in closed form (least squares) for the rounding it gives.
IMATRIX_FACTORS = (1.0, 0.98, 0.96, 0.94, 0.92, 0.9, 0.88, 0.86, 0.84, 0.82, 0.8, 1.02, 1.04, 1.06, 1.08)


def float_matmul_weights(model) -> dict:
    """{output name: (activation input name, weight name)} of the MatMuls that read a 2-D constant weight: what
    the INT4 quantizer turns into MatMulNBits (it keeps each output name)."""
    inits = {i.name: i for i in model.graph.initializer}
    return {n.output[0]: (n.input[0], n.input[1]) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2}


def importance(model, feeds: list, activations: list, threads: int | None = None) -> dict:
    """Mean square of each input channel of ``activations`` (names of float tensors in ``model``) over every
    token of the calibration ``feeds``: the graph runs once per feed with those tensors as extra outputs."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from edgekit.artifacts import scratch_dir
    from edgekit.runtimes.ort_runtime import session_options

    if not activations:  # every weight MatMul kept in float: nothing to weigh
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None)
                              for a in activations if a not in known)
    sums: dict = {}
    tokens = 0
    with scratch_dir("edgekit-imatrix-") as tmp:
        # a model over 2 GB cannot be handed to onnxruntime as one protobuf: weights beside it, in scratch
        path = tmp / "probe.onnx"
        onnx.save_model(probe, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="probe.onnx.data", size_threshold=1024)
        del probe
        opts = session_options(threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for feed in feeds:
            outs = dict(zip(activations, session.run(activations, feed)))
            for a, x in outs.items():
                x = x.reshape(-1, x.shape[-1]).astype(np.float64)
                sums[a] = sums.get(a, 0.0) + np.einsum("ij,ij->j", x, x)
            tokens += int(np.prod(next(iter(outs.values())).shape[:-1]))
        del session  # before its files go
    return {a: (v / max(tokens, 1)).astype(np.float32) for a, v in sums.items()}


def search_block_scales(x, weight, symmetric: bool):
    """Per block (a row of ``x``, shape (blocks, block size)), the 4-bit quantization with the least error
    weighted by ``weight`` (same shape) among IMATRIX_FACTORS times the round-to-nearest scale, each also refitted
    by least squares. Returns (codes 0..15 as stored, scales, zero points or None, weighted error, round-to-nearest
    weighted error)."""
    import numpy as np

    rows = np.arange(len(x))
    if symmetric:  # onnxruntime's: the block's largest-magnitude weight maps to -8; stored codes carry +8
        base = x[rows, np.abs(x).argmax(1)][:, None] / -8.0
        lo, hi = -8.0, 7.0
    else:  # onnxruntime's: the range [min(x, 0), max(x, 0)] over 0..15 with a rounded zero point
        mn = np.minimum(x.min(1, keepdims=True), 0)
        base = (np.maximum(x.max(1, keepdims=True), 0) - mn) / 15.0
        lo, hi = 0.0, 15.0
    base[base == 0] = 1.0  # an all-zero block: any scale gives codes of zero

    def fit(scale, offset):
        q = np.clip(np.round(x / scale) + offset, lo, hi) - offset
        return q, np.einsum("ij,ij->i", weight, (q * scale - x) ** 2)[:, None]

    def offset_for(scale):
        return 0.0 if symmetric else np.clip(np.round(-mn / scale), 0, 15)

    best = []  # scale, zero point, codes, error: the best candidate so far, per block

    def consider(scale, offset, q, e):
        if not best:
            best.extend((scale.copy(), offset, q.copy(), e.copy()))
            return
        better = (e < best[3])[:, 0]
        for i, v in ((0, scale), (2, q), (3, e)):
            best[i][better] = v[better]
        if not symmetric:
            best[1] = np.where(better[:, None], offset, best[1])

    def refitted(scale, q):  # the least-squares scale for the codes ``q`` gave, and its own rounding
        num, den = np.einsum("ij,ij->i", weight * x, q)[:, None], np.einsum("ij,ij->i", weight * q, q)[:, None]
        refit = np.where(den > 0, num / np.where(den > 0, den, 1), scale)
        refit[refit == 0] = 1.0
        offset = offset_for(refit)
        consider(refit, offset, *fit(refit, offset))

    rtn_z = offset_for(base)
    rtn_q, rtn_e = fit(base, rtn_z)
    consider(base, rtn_z, rtn_q, rtn_e)  # round to nearest: the candidate every other one must beat
    for f in IMATRIX_FACTORS[1:]:
        s = base * f
        z = offset_for(s)
        q, e = fit(s, z)
        consider(s, z, q, e)
        refitted(s, q)
    refitted(base, rtn_q)  # last, so that an exact tie goes to the candidates before it, as it always has
    best_s, best_z, best_q, best_e = best
    codes = (best_q + (8 if symmetric else best_z)).astype(np.uint8)
    return codes, best_s[:, 0], None if symmetric else best_z[:, 0].astype(np.uint8), best_e[:, 0], rtn_e[:, 0]


def _nibbles(packed, count: int):
    """Unpack uint8 ``packed`` (..., n) to 4-bit values (..., count), low nibble first (MatMulNBits' order)."""
    import numpy as np

    return np.stack([packed & 0x0F, packed >> 4], -1).reshape(*packed.shape[:-1], -1)[..., :count]


def _pack(nibbles):
    import numpy as np

    n = nibbles.shape[-1]
    if n % 2:
        nibbles = np.concatenate([nibbles, np.zeros((*nibbles.shape[:-1], 1), nibbles.dtype)], -1)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)


def apply_importance(model, originals: dict, floats: dict, imp: dict, progress: Progress,
                     chunk: int = 1 << 22) -> dict:
    """Rewrite the codes, scales and zero points of each 4-bit MatMulNBits of ``model`` (onnxruntime's round to
    nearest) whose output is in ``originals`` ({output: (activation, weight name)}, before quantization;
    ``floats`` {weight name: array}) with ``search_block_scales`` against the activation's importance. Returns
    what the report says: matrices searched and the weighted error against round to nearest."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    todo = []
    for n in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
        if n.op_type == "MatMulNBits" and a.get("bits", 4) == 4 and n.output[0] in originals:
            act, w = originals[n.output[0]]
            if act in imp and imp[act].shape[0] == a["K"]:
                todo.append((n, a, floats[w], imp[act]))
    ratios = []
    with progress.step("Searching block scales against the calibration activations", total=len(todo)) as step:
        for n, a, w, channel in todo:
            k, b = a["K"], a["block_size"]
            kb = -(-k // b)
            padded_w = np.zeros((kb * b, w.shape[1]), np.float32)
            padded_w[:k] = w
            padded_i = np.zeros(kb * b, np.float32)
            # a channel no calibration token drove still counts a little, so that its weights stay rounded
            padded_i[:k] = channel + 1e-6 * (float(channel.mean()) or 1.0)
            x_all = padded_w.T.reshape(-1, b)  # (N * kb, b): column n's blocks in order, as MatMulNBits stores them
            w_all = np.broadcast_to(padded_i.reshape(kb, b), (w.shape[1], kb, b)).reshape(-1, b)
            sym = len(n.input) < 4 or not n.input[3]
            codes, scales, zps, err, rtn = [], [], [], 0.0, 0.0
            step_rows = max(1, chunk // b)
            for i in range(0, len(x_all), step_rows):
                c, s, z, e, r = search_block_scales(x_all[i:i + step_rows], w_all[i:i + step_rows], sym)
                codes.append(c), scales.append(s), zps.append(z)
                err, rtn = err + float(e.sum()), rtn + float(r.sum())
            ratios.append(err / rtn if rtn else 1.0)
            old_b = numpy_helper.to_array(inits[n.input[1]])  # (N, kb, b / 2)
            stored = _nibbles(old_b, b).reshape(w.shape[1], kb * b)
            stored[:, :k] = np.concatenate(codes).reshape(w.shape[1], kb * b)[:, :k]  # padding stays onnxruntime's
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(_pack(stored.reshape(-1, b)).reshape(old_b.shape),
                                                               n.input[1]))
            old_s = numpy_helper.to_array(inits[n.input[2]])
            inits[n.input[2]].CopyFrom(numpy_helper.from_array(
                np.concatenate(scales).astype(old_s.dtype).reshape(old_s.shape), n.input[2]))
            if not sym:
                old_z = numpy_helper.to_array(inits[n.input[3]])  # (N, ceil(kb / 2))
                zp = _nibbles(old_z, old_z.shape[-1] * 2)
                zp[:, :kb] = np.concatenate(zps).reshape(w.shape[1], kb)
                inits[n.input[3]].CopyFrom(numpy_helper.from_array(_pack(zp), n.input[3]))
            step.advance()
    return {"searched_matrices": len(ratios),
            "weighted_error_vs_rtn": {"median": float(np.median(ratios)) if ratios else None,
                                      "max": float(max(ratios)) if ratios else None}}
