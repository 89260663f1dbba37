"""The block-scale search of ``--method imatrix`` (edgekit.compress.int4) on its own: never worse than round to
nearest in the weighted error it minimises, and packed in MatMulNBits' layout exactly (onnxruntime computes with
the codes, scales and zero points the search chose), odd block counts and a padded last block included."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.compress.int4 import apply_importance, float_matmul_weights, search_block_scales
from edgekit.progress import Progress


@pytest.mark.parametrize("symmetric", [True, False])
def test_weighted_error_never_above_round_to_nearest(symmetric):
    rng = np.random.default_rng(0)
    x = rng.standard_t(4, size=(500, 32)).astype(np.float32)
    x[0] = 0  # an all-zero block
    weight = rng.gamma(0.5, size=(500, 32)).astype(np.float32)  # a few channels matter much more than the rest
    codes, scales, zps, err, rtn = search_block_scales(x, weight, symmetric)
    assert codes.dtype == np.uint8 and codes.min() >= 0 and codes.max() <= 15
    zero = 8 if symmetric else zps[:, None].astype(np.float32)
    deq = (codes.astype(np.float32) - zero) * scales[:, None]
    # the error it reports is the error of what it returns
    np.testing.assert_allclose(((deq - x) ** 2 * weight).sum(1), err, rtol=1e-4, atol=1e-7)
    assert np.all(err <= rtn * (1 + 1e-6)) and err.sum() < 0.97 * rtn.sum()
    assert np.all(deq[0] == 0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_search_is_packed_as_matmulnbits_reads_it(symmetric):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    k, n, block = 80, 6, 32  # 3 blocks a column (odd: the zero points' last byte is half used), last one padded
    rng = np.random.default_rng(1)
    w = rng.normal(size=(k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    originals = float_matmul_weights(model)
    assert originals == {"y": ("x", "w")}
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=symmetric, accuracy_level=1)
    q.process()
    model = q.model.model
    imp = {"x": rng.gamma(0.5, size=k).astype(np.float32)}
    report = apply_importance(model, originals, {"w": w}, imp, Progress())
    assert report["searched_matrices"] == 1 and report["weighted_error_vs_rtn"]["max"] < 1

    # the expected weights, from the search itself over the same blocks
    padded = np.zeros((96, n), np.float32)
    padded[:k] = w
    ipad = np.zeros(96, np.float32)
    ipad[:k] = imp["x"] + 1e-6 * imp["x"].mean()
    codes, scales, zps, _, _ = search_block_scales(padded.T.reshape(-1, block),
                                                   np.tile(ipad.reshape(3, block), (n, 1)), symmetric)
    zero = 8 if symmetric else zps[:, None].astype(np.float32)
    deq = ((codes.astype(np.float32) - zero) * scales[:, None]).reshape(n, 96).T[:k]
    x = rng.normal(size=(4, k)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ deq, rtol=1e-4, atol=1e-4)
    # and it is not round to nearest's result any more
    rtn = MatMulNBitsQuantizer(onnx.load_from_string(onnx.helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()), bits=4, block_size=block,
        is_symmetric=symmetric, accuracy_level=1)
    rtn.process()
    rtn_out = ort.InferenceSession(rtn.model.model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert not np.allclose(rtn_out, x @ deq, atol=1e-4)


def test_nothing_to_weigh_runs_nothing():
    """Every weight MatMul kept in float (--exclude-nodes, --lm-head float): no session is built, nothing searched."""
    from edgekit.compress.int4 import importance

    assert importance(onnx.ModelProto(), [{"x": np.zeros(1)}], []) == {}
    assert apply_importance(onnx.ModelProto(), {}, {}, {}, Progress()) == {
        "searched_matrices": 0, "weighted_error_vs_rtn": {"median": None, "max": None}}
