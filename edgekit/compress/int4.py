"""Weight-only INT4 for decoder LMs (``--bits 4``): onnxruntime's MatMulNBits (round to nearest) and NNCF's AWQ
and scale estimation as the data-aware method (the graph rewrites around them are in ``edgekit.compress.rewrites``).
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


def _calibration_feeds(model, src: Path, cfg) -> tuple[list, dict]:
    if not cfg.calibration_data:
        raise EdgekitError("--method awq needs calibration text", "pass --calibration-data FILE (training text, not "
                           "the evaluation set)")
    feeds, column = prefill_feeds(model.graph, src.parent, cfg.calibration_data, cfg.text_column,
                                  cfg.calibration_samples, cfg.max_length, "--calibration-data")
    return feeds, {"source": str(Path(cfg.calibration_data).resolve()), "samples": len(feeds), "method": "awq",
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
    feeds, calibration = _calibration_feeds(model, src, cfg)
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
        z = np.pad(zp, ((0, 0), (0, blocks % 2))) & 0x0F
        inits[n.input[3]].CopyFrom(numpy_helper.from_array((z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8),
                                                           n.input[3]))

