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
