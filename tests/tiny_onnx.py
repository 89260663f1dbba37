"""Tiny hand-built ONNX classifiers (no torch, milliseconds): for runtime, planning and device plumbing tests.

logits = mean over the sequence of (input_ids * attention_mask) times a 1x2 weight: meaningless as a model,
real as an ONNX artifact (dynamic [batch, sequence] int64 inputs, a 'logits' output, edgekit.json).
"""

from __future__ import annotations

import json
from pathlib import Path


def tiny_classifier(folder: Path, qdq: bool = False, zero_point: int = 0, fp16: bool = False,
                    static_batch: int | None = None, rank3: bool = False) -> Path:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    batch = static_batch if static_batch else "batch"
    shape = [batch, "sequence", 4] if rank3 else [batch, "sequence"]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, shape),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, shape)]
    inits = [numpy_helper.from_array(np.array([[0.5, -0.5]], dtype=np.float32), "w")]
    nodes = [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["ids_f", "mask_f"], ["masked"]),
             helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=1)]
    pooled = "pooled"
    if rank3:
        nodes.append(helper.make_node("ReduceMean", ["pooled"], ["pooled2"], axes=[2], keepdims=0))
        pooled = "pooled2"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.05, dtype=np.float32), "scale"),
                  numpy_helper.from_array(np.array(zero_point, dtype=np.int8), "zp")]
        nodes += [helper.make_node("QuantizeLinear", [pooled, "scale", "zp"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["dq"])]
        pooled = "dq"
    if fp16:
        nodes.append(helper.make_node("Cast", [pooled], ["half"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", ["half"], ["back"], to=TensorProto.FLOAT))
        pooled = "back"
    nodes.append(helper.make_node("MatMul", [pooled, "w"], ["logits"]))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])
    graph = helper.make_graph(nodes, "tiny", inputs, [out], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "edgekit.json").write_text(json.dumps({"stage": "export", "task": "text-classification"}))
    return folder


def append_matmul_chain(model_file: Path, matmuls: int, dim: int = 256, seed: int = 0) -> Path:
    """Slow an ONNX model down, in place, without changing its outputs: a chain of ``matmuls`` dim x dim MatMuls
    on a matrix that depends on the attention mask (so onnxruntime cannot fold it away), added to the first
    output times 0. The weights are orthogonal, so the chain stays finite (0 x a finite number is 0)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_file))
    g = model.graph
    out = g.output[0].name
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    p = "edgekit_slow_"
    g.initializer.extend([numpy_helper.from_array(q.astype(np.float32), f"{p}w"),
                          numpy_helper.from_array(np.eye(dim, dtype=np.float32), f"{p}x0"),
                          numpy_helper.from_array(np.array(0.0, dtype=np.float32), f"{p}zero")])
    mask = next(i.name for i in g.input if i.name == "attention_mask")
    nodes = [helper.make_node("Cast", [mask], [f"{p}mask"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMax", [f"{p}mask"], [f"{p}s"], keepdims=0),
             helper.make_node("Mul", [f"{p}x0", f"{p}s"], [f"{p}x_0"])]
    for k in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"{p}x_{k}", f"{p}w"], [f"{p}x_{k + 1}"]))
    nodes += [helper.make_node("ReduceSum", [f"{p}x_{matmuls}"], [f"{p}sum"], keepdims=0),
              helper.make_node("Mul", [f"{p}sum", f"{p}zero"], [f"{p}nothing"]),
              helper.make_node("Add", [f"{out}{p}orig", f"{p}nothing"], [out])]
    for n in g.node:  # the old output is renamed; the chain's Add writes the output under its name
        n.output[:] = [f"{out}{p}orig" if o == out else o for o in n.output]
    g.node.extend(nodes)
    onnx.save(model, str(model_file))
    return model_file
