"""Graph rewrites on an ONNX model, in place, that the quantizers need and neither onnx nor onnxruntime ships:
GPT-2's Gemm as MatMul and a tied weight's Transpose folded into its own initializer, so that every weight
matrix can be quantized, and sibling MatMulNBits merged into one. It imports nothing of edgekit's: the INT8 and
INT4 stages both use it, and INT4 reads its calibration text through modules that import INT8.
"""

from __future__ import annotations

# a merged MatMulNBits is named after the nodes it holds, joined by this (edgekit.compress.int4.weight_bits
# lists them again one by one)
MERGED_NAME_SEPARATOR = "+"


def gemm_to_matmul(model) -> int:
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


def fold_weight_transposes(model) -> int:
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


def fuse_sibling_matmulnbits(model) -> list[list[str]]:
    """MatMulNBits nodes that read the same input (a layer's gate and up projections; q, k and v where the
    exporter left them apart) merged into one MatMulNBits over their weights stacked along N, followed by a
    Split back into the original outputs, in place. Exact: MatMulNBits quantizes each output column on its own
    (its blocks run along K), so the stacked B, scales, zero points and bias hold the same values. One kernel
    launch instead of two or three per decode step (onnxruntime fuses no MatMulNBits siblings on a CPU; the
    builder packs q, k and v only). Only nodes alike in K, bits, block size, accuracy level and in which optional
    inputs they have are merged. Returns the groups merged, by node name."""
    import numpy as np
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, int] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1

    def attrs(n) -> dict:
        return {x.name: helper.get_attribute_value(x) for x in n.attribute}

    def signature(n):
        a = attrs(n)
        present = tuple(bool(i) for i in list(n.input[1:]) + [""] * (6 - len(n.input)))
        consts = all(i in inits and consumers[i] == 1 for i in n.input[1:] if i)
        if not consts or (len(n.input) > 4 and n.input[4]):  # g_idx: act-order layouts are not stacked
            return None
        return (n.input[0], a["K"], a.get("bits", 4), a["block_size"], a.get("accuracy_level", 0), present,
                n.domain)

    groups: dict[tuple, list] = {}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            key = signature(n)
            if key is not None:
                groups.setdefault(key, []).append(n)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    merged = []
    for key, nodes in groups.items():
        if len(nodes) < 2:
            continue
        first = nodes[0]
        sizes = [attrs(n)["N"] for n in nodes]
        name = MERGED_NAME_SEPARATOR.join(n.name for n in nodes)
        inputs = [first.input[0]]
        for slot in range(1, len(first.input)):
            if not first.input[slot]:
                inputs.append("")
                continue
            parts = [numpy_helper.to_array(inits[n.input[slot]]) for n in nodes]
            flat = parts[0].ndim == 1
            if flat and slot in (2, 3):  # scales / zero points stored flat, N-major
                parts = [p.reshape(s, -1) for p, s in zip(parts, sizes)]
            stacked = np.concatenate(parts, axis=0)
            if flat:
                stacked = stacked.reshape(-1)
            new = f"{name}.input{slot}"
            model.graph.initializer.append(numpy_helper.from_array(stacked, new))
            inputs.append(new)
            for n in nodes:
                model.graph.initializer.remove(inits[n.input[slot]])
        fused_out = f"{name}/output_0"
        node = helper.make_node("MatMulNBits", inputs, [fused_out], name=name, domain=first.domain,
                                **{**attrs(first), "N": sum(sizes)})
        outputs = [n.output[0] for n in nodes]
        if opset >= 13:
            split_sizes = f"{name}/split_sizes"
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(sizes, np.int64), split_sizes))
            split = helper.make_node("Split", [fused_out, split_sizes], outputs, name=f"{name}/Split", axis=-1)
        else:
            split = helper.make_node("Split", [fused_out], outputs, name=f"{name}/Split", axis=-1, split=sizes)
        # in place of the first of them, so that the graph stays topologically sorted (they share one input)
        at = list(model.graph.node).index(first)
        for n in nodes:
            model.graph.node.remove(n)
        model.graph.node.insert(at, split)
        model.graph.node.insert(at, node)
        merged.append([n.name for n in nodes])
    return merged
