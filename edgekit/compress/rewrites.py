"""Graph rewrites on an ONNX model, in place, that the quantizers need and neither onnx nor onnxruntime ships:
GPT-2's Gemm as MatMul and a tied weight's Transpose folded into its own initializer, so that every weight
matrix can be quantized. It imports nothing of edgekit's: the INT8 and INT4 stages both use it, and INT4 reads
its calibration text through modules that import INT8.
"""

from __future__ import annotations


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
