"""A classifier that predicts what the original does in FP32 but that INT8 breaks in one known MatMul: the test
model for culprit ranking and for the recipe search's exclusions."""

from __future__ import annotations

import shutil
from pathlib import Path

DEAD, AMPLIFIER = 0, 1  # the two FFN neurons given new roles
DEAD_BIAS = -1.0e4  # GELU(-1e4 + w.x) is exactly 0 in float32 (erf saturates at -1)
HUGE = 5.0e3  # the dead neuron's outgoing weights
LOUD = 1024.0  # the amplifier's constant activation: GELU(1024) is exactly 1024; a power of two, so the
#                bias that cancels it is exact to float32's last bit


def fragile_node(layer: int = 1) -> str:
    """The exported name of the MatMul that :func:`build_fragile_classifier` makes INT8-hostile (the same in the
    fused graph: onnxruntime's fusion keeps the FFN MatMuls' names)."""
    return f"/bert/encoder/layer.{layer}/output/dense/MatMul"


def build_fragile_classifier(src_ckpt: Path, dst: Path, layer: int = 1) -> Path:
    """Copy the BERT sequence classifier ``src_ckpt`` to ``dst`` with the FFN down-projection of encoder ``layer``
    (``fragile_node(layer)``) made INT8-hostile; return ``dst``.

    Two of the layer's FFN neurons get new roles (their old contributions, 2 of the FFN's neurons, are given
    up: the FP32 predictions stay the original's, which the tests check):

    - a *dead* neuron: up-projection bias -1e4, so its GELU output is exactly 0 on every input; its
      down-projection row is 5e3. In FP32 0 x 5e3 adds nothing, but that row holds the largest weight of every
      output channel, so per-channel and per-tensor INT8 scales alike are about 5e3 / 127 and every other
      weight of the matrix rounds to 0;
    - an *amplifier*: up-projection row 0 and bias 1024, so its GELU output is exactly 1024 on every input; its
      down-projection row is +-1 (alternating, so LayerNorm's mean subtraction cannot absorb it) and the
      down-projection bias cancels the +-1024 it adds. In FP32 nothing changes; in INT8 the +-1 weights round
      to 0 with the rest and the uncancelled bias throws +-1024 into the residual stream.

    A tiny model barely needs one FFN (losing it alone kept the accuracy at 100%): the amplifier is what makes
    the rounding cost the accuracy, so that the gate fails, and keeping that one MatMul in float repairs it.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(src_ckpt, dst)
    model = AutoModelForSequenceClassification.from_pretrained(dst)
    block = model.base_model.encoder.layer[layer]
    up, down = block.intermediate.dense, block.output.dense  # nn.Linear keeps weights as (out, in)
    with torch.no_grad():
        up.bias[DEAD] = DEAD_BIAS
        down.weight[:, DEAD] = HUGE
        up.weight[AMPLIFIER] = 0.0
        up.bias[AMPLIFIER] = LOUD
        signs = torch.tensor([1.0, -1.0]).repeat(down.out_features // 2 + 1)[: down.out_features]
        down.weight[:, AMPLIFIER] = signs
        down.bias -= signs * LOUD
    model.save_pretrained(dst)
    return dst


SKEW = 1.0e3  # one query channel scaled up by this, the matching key channel down by it


def skewed_attention_node(layer: int = 0) -> str:
    """The fused graph's name of the Attention node :func:`build_skewed_attention_classifier` skews (onnxruntime's
    fusion names them Attention_0, Attention_1 ... in layer order)."""
    return f"Attention_{layer}"


def build_skewed_attention_classifier(src_ckpt: Path, dst: Path, layer: int = 0, channels: int = 4) -> Path:
    """Copy the BERT sequence classifier ``src_ckpt`` to ``dst`` with ``channels`` query channels of encoder
    ``layer`` multiplied by SKEW and the matching key channels divided by it; return ``dst``.

    Every query-key product is unchanged (q_d * s . k_d / s), so FP32 predicts what the original does. The fused
    Attention node's QKV weight then has a few output columns SKEW times larger than the rest: one per-tensor
    INT8 scale rounds every other weight of the layer's query, key and value projections to 0 (the layer's
    attention is lost), while per-channel scales give each column its own and quantize it as well as the
    original. This is the culprit that per-channel scales on one node mend, where the fragile FFN above needs
    float. In the tests' two-layer classifier, losing layer 0's attention costs 7.5 points of accuracy (layer
    1's: none).
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    shutil.copytree(src_ckpt, dst)
    model = AutoModelForSequenceClassification.from_pretrained(dst)
    attn = model.base_model.encoder.layer[layer].attention.self
    with torch.no_grad():
        for d in range(channels):
            attn.query.weight[d] *= SKEW
            attn.query.bias[d] *= SKEW
            attn.key.weight[d] /= SKEW
            attn.key.bias[d] /= SKEW
    model.save_pretrained(dst)
    return dst
