"""onnxruntime's matrix-product kernels on this CPU, one node at a time: what bounds INT4's time to first token.

A decoder's prefill multiplies a whole prompt (M = 128 rows here) by every weight matrix; a decode step, one row
(M = 1). This script times the four weight products of one transformer layer of the SmolLM2-135M and
Qwen2.5-0.5B architectures (their published shapes: q/k/v together, o, gate and up together, down, as
onnxruntime-genai's builder and edgekit's sibling merge lay them out) with each kernel edgekit and its peers use:

- FP32 ``MatMul`` (MLAS SGEMM);
- INT8 dynamic: ``onnxruntime.quantization.quantize_dynamic`` (per-channel int8 weights), which onnxruntime runs
  as ``DynamicQuantizeMatMul`` (MLAS QGEMM, VNNI where the CPU has it): edgekit INT8 and Optimum INT8;
- INT4 weight-only: ``MatMulNBits`` from ``MatMulNBitsQuantizer`` (symmetric blocks of 32 and 128,
  ``accuracy_level`` 4 = int8 compute): edgekit INT4 and onnxruntime-genai's builder INT4.

Same random weights and input for every kernel, edgekit's session options (same threads, spinning off), the
kernels interleaved round by round, the median of the rounds. A figure per call, and the sum over one layer.

    python benchmarks/matmul_kernels.py [--threads N] [--rounds 15]
Writes benchmarks/results/matmul_kernels.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import add_common_args  # noqa: E402

# (name, K, N) of one layer's weight products, from the published config.json (hidden, intermediate, heads)
SHAPES = {
    "SmolLM2-135M": [("qkv", 576, 576 + 2 * 192), ("o", 576, 576), ("gate+up", 576, 2 * 1536), ("down", 1536, 576)],
    "Qwen2.5-0.5B": [("qkv", 896, 896 + 2 * 128), ("o", 896, 896), ("gate+up", 896, 2 * 4864), ("down", 4864, 896)],
}
ROWS = (1, 128)  # a decode step, a 128-token prefill
KERNELS = ("fp32", "int8", "int4-b32", "int4-b128")


def float_model(w):
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")], "one_matmul",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "M", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def quantized(kernel: str, w, scratch: Path) -> bytes:
    """The one-node model of ``kernel``, serialized."""
    import onnx

    model = float_model(w)
    if kernel == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from edgekit.compress.int8 import default_reduce_range

        onnx.save(model, scratch / "fp32.onnx")
        quantize_dynamic(scratch / "fp32.onnx", scratch / "int8.onnx", per_channel=True,
                         reduce_range=default_reduce_range(), weight_type=QuantType.QInt8)
        return (scratch / "int8.onnx").read_bytes()
    if kernel.startswith("int4"):
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, bits=4, block_size=int(kernel.split("-b")[1]), is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        model = q.model.model
    return model.SerializeToString()


def time_shape(k: int, n: int, threads: int, rounds: int, scratch: Path) -> dict:
    """Median microseconds per call of each kernel at each row count, interleaved round by round."""
    import numpy as np
    import onnxruntime as ort

    from edgekit.runtimes.ort_runtime import session_options

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    sessions = {kern: ort.InferenceSession(quantized(kern, w, scratch), session_options(threads),
                                           providers=["CPUExecutionProvider"]) for kern in KERNELS}
    out = {}
    for m in ROWS:
        x = rng.standard_normal((1, m, k)).astype(np.float32)
        reps = max(1, 2000 // m)  # enough calls a round that the timer's resolution does not matter
        for s in sessions.values():  # warm-up: MLAS packs the weights at the first run
            for _ in range(3):
                s.run(None, {"x": x})
        times = {kern: [] for kern in KERNELS}
        for _ in range(rounds):
            for kern, s in sessions.items():
                t = time.perf_counter()
                for _ in range(reps):
                    s.run(None, {"x": x})
                times[kern].append((time.perf_counter() - t) / reps * 1e6)
        out[m] = {kern: float(np.median(v)) for kern, v in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, "matmul-kernels")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # onnxruntime.quantization's INFO lines for every model
    from edgekit.benchmarks.environment import environment

    env = environment(threads=args.threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgekit-matmul-") as tmp:
        for arch, shapes in SHAPES.items():
            results[arch] = {name: {"k": k, "n": n, "us_per_call": time_shape(k, n, args.threads, args.rounds,
                                                                               Path(tmp))}
                             for name, k, n in shapes}
    lines = [f"Threads {args.threads}; microseconds per call (median of {args.rounds} interleaved rounds); "
             f"ISA flags: {', '.join(env.get('isa_flags', [])) or 'n/a'}", "",
             "| model | product | K×N | rows | FP32 | INT8 dynamic | INT4 b32 | INT4 b128 | INT4 b128 / INT8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for arch, shapes in results.items():
        for m in ROWS:
            layer = {kern: 0.0 for kern in KERNELS}
            for name, r in shapes.items():
                t = r["us_per_call"][m]
                layer = {kern: layer[kern] + t[kern] for kern in KERNELS}
                lines.append(f"| {arch} | {name} | {r['k']}×{r['n']} | {m} | " + " | ".join(f"{t[kern]:.0f}" for kern in KERNELS)
                             + f" | {t['int4-b128'] / t['int8']:.2f}x |")
            lines.append(f"| {arch} | **one layer** | | {m} | " + " | ".join(f"**{layer[kern]:.0f}**" for kern in KERNELS)
                         + f" | **{layer['int4-b128'] / layer['int8']:.2f}x** |")
    table = "\n".join(lines)
    print(table)
    out = HERE / "results" / "matmul_kernels.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"environment": env, "threads": args.threads, "rounds": args.rounds,
                               "rows": list(ROWS), "results": results, "table": table}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
