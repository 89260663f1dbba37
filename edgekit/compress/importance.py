"""Which heads and neurons to keep: Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers".

1. Mask gradients. Every head and FFN neuron gets a multiplicative mask variable m = 1 (applied to the input of
   the output projections, so it works the same for eager and SDPA attention), and every layer one on its
   residual contribution, out = x + m (layer(x) - x), so that m = 0 is the layer removed. One backward pass
   per batch gives each sample's gradient g_s = dL_s/dm for all three (the masks carry a batch dimension, so
   per-sample gradients come out of a single backward). The Fisher information sum_s g_s g_s^T approximates
   the loss increase of zeroing a mask to second order; its diagonal is the importance score, on one scale
   for heads, neurons and layers, which is what lets the depth search weigh a layer against its heads.
2. Mask search (their Algorithm 1): keep the set with the largest summed importance under a FLOPs budget,
   trading heads against neurons globally, so the per-layer budgets come out different. Whole layers go
   first (the least important by their own mask), then the search runs in the layers that are left; with
   ``depth`` every count of removed layers is tried and the smallest estimated loss wins.
3. Mask rearrangement: within each layer, swap kept and pruned elements while that lowers the
   block-diagonal Fisher estimate of the loss increase (the diagonal alone ignores correlated elements).

Kwon-style Fisher importance and the search are hand-written: torch-pruning and NNCF offer magnitude/Taylor
importance on parameters and training-based pruning, not Fisher mask importance under a FLOPs constraint.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from edgekit.compress.prune_arch import Dims, EncoderArch, encoder_layers, get_module, requires_grad

LABELED = "fisher-labels"
RECONSTRUCTION = "fisher-reconstruction"


@contextlib.contextmanager
def mask_hooks(model: nn.Module, arch: EncoderArch, dims: Dims, masks: dict):
    """While active, scale each head's context and each neuron's activation by masks['heads'][:, layer, i]
    and masks['neurons'][:, layer, i], and, where masks has 'layers', each layer's residual contribution by
    masks['layers'][:, layer] (all per sample)."""
    handles = []

    def heads_hook(i):
        def hook(_module, args):
            x = args[0]
            b, t, _ = x.shape
            m = masks["heads"][:, i].to(x.dtype)[:, None, :, None]
            return (x.view(b, t, dims.heads, dims.head_size).mul(m).view(b, t, -1),) + args[1:]
        return hook

    def neurons_hook(i):
        def hook(_module, args):
            return (args[0] * masks["neurons"][:, i].to(args[0].dtype)[:, None, :],) + args[1:]
        return hook

    def layer_hook(i):
        def hook(_module, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            # edgekit never asks for attentions, so the hidden state is the layer's first (only) output
            h = out[0] if isinstance(out, tuple) else out
            mixed = x + masks["layers"][:, i].to(h.dtype)[:, None, None] * (h - x)
            return (mixed,) + out[1:] if isinstance(out, tuple) else mixed
        return hook

    for i, layer in enumerate(encoder_layers(model, arch)):
        handles.append(get_module(layer, arch.attn_out).register_forward_pre_hook(heads_hook(i)))
        handles.append(get_module(layer, arch.ffn_out).register_forward_pre_hook(neurons_hook(i)))
        if "layers" in masks:
            handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_output(model: nn.Module, batch: dict, output: str) -> torch.Tensor:
    """The task's output (``Task.output``: logits or last_hidden_state) for a batch; labels are not inputs."""
    return getattr(model(**{k: v for k, v in batch.items() if k != "labels"}), output)


def _label_loss(output: torch.Tensor, batch: dict) -> torch.Tensor:
    """Summed cross-entropy with the batch's labels (per sequence, or per token: -100 is ignored)."""
    return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), batch["labels"].reshape(-1),
                                       ignore_index=-100, reduction="sum")


def _surrogate_loss(output: torch.Tensor, batch: dict, labeled: bool, softmax: bool,
                    generator: torch.Generator) -> torch.Tensor:
    """A scalar whose per-sample mask gradients g_s satisfy E[g_s g_s^T] = the Fisher of the chosen criterion.

    Labeled: cross-entropy with the true labels (the empirical Fisher, as in Kwon et al.).

    Unlabeled (output reconstruction): the criterion is the divergence of the pruned model's output from the
    original's, KL(p_orig || p_masked) for classifiers and MSE on the hidden states for feature extraction.
    Its gradient is exactly zero at m = 1, so first-order (Taylor) scores would all be zero; its Hessian there
    is the model's own Fisher information J^T H J (H = diag(p) - p p^T for softmax outputs, I for MSE). We
    estimate it with one random projection per sample, g = J^T S^T v with v ~ N(0, I) and S^T S = H. This is
    the true Fisher rather than "argmax pseudo-labels": for a confident model the pseudo-label gradient is
    ~(1 - p) ~ 0 and the scores would be dominated by noise, and unlike sampling labels from p it gives every
    sample a weight proportional to how much its output can still move.
    """
    valid = batch["attention_mask"].bool()
    if labeled:
        return _label_loss(output, batch)
    v = torch.randn(output.shape, generator=generator, dtype=output.dtype)
    if softmax:
        p = output.detach().softmax(-1)
        w = p.sqrt() * v
        coef = w - p * w.sum(-1, keepdim=True)
    else:
        coef = v
    if output.dim() == 3:  # per-token outputs: padding carries no signal
        coef = coef * valid[..., None]
    return (output * coef).sum()


def mask_gradients(model: nn.Module, arch: EncoderArch, batches: list[dict], labeled: bool, softmax: bool,
                   output: str, seed: int = 0, progress=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the criterion w.r.t. the head masks (S, L, H), neuron masks (S, L, N) and
    layer masks (S, L), from one backward pass per batch."""
    dims = Dims.of(model.config, arch)
    generator = torch.Generator().manual_seed(seed)
    grads = []
    with requires_grad(model, False):  # only the masks need gradients
        for step, batch in enumerate(batches):
            b = batch["input_ids"].shape[0]
            masks = {"heads": torch.ones(b, dims.layers, dims.heads, requires_grad=True),
                     "neurons": torch.ones(b, dims.layers, dims.ffn, requires_grad=True),
                     "layers": torch.ones(b, dims.layers, requires_grad=True)}
            with torch.enable_grad(), mask_hooks(model, arch, dims, masks):
                loss = _surrogate_loss(model_output(model, batch, output), batch, labeled, softmax, generator)
                grads.append(torch.autograd.grad(loss, [masks["heads"], masks["neurons"], masks["layers"]]))
            if progress:
                progress("Fisher importance", step + 1, len(batches))
    grads_h, grads_n, grads_l = (torch.cat(g) for g in zip(*grads))
    return grads_h, grads_n, grads_l


# ---- mask search -----------------------------------------------------------------------------------------


def _bypass_loss(model: nn.Module, arch: EncoderArch, dims: Dims, batches: list[dict], references: list,
                 keep_layers: torch.Tensor, labeled: bool, softmax: bool, output: str) -> float:
    """The criterion measured with every layer outside ``keep_layers`` bypassed (its layer mask at 0), over the
    batches: mean cross-entropy with the labels, or the divergence from the original's outputs (``references``):
    KL(p_orig || p) for a softmax head, mean squared error of the outputs otherwise (padding left out)."""
    total, count = 0.0, 0
    for batch, ref in zip(batches, references):
        b = batch["input_ids"].shape[0]
        masks = {"heads": torch.ones(b, dims.layers, dims.heads), "neurons": torch.ones(b, dims.layers, dims.ffn),
                 "layers": keep_layers.to(torch.float32).expand(b, -1)}
        with mask_hooks(model, arch, dims, masks):
            out = model_output(model, batch, output)
        if labeled:
            loss, n = _label_loss(out, batch), int((batch["labels"] != -100).sum())
        else:
            valid = batch["attention_mask"].bool() if out.dim() == 3 else torch.ones(out.shape[0], dtype=torch.bool)
            if softmax:
                per = nn.functional.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                           reduction="none").sum(-1)
            else:
                per = (out - ref).pow(2).mean(-1)
            loss, n = per[valid].sum(), int(valid.sum())
        total, count = total + float(loss), count + n
    return total / max(count, 1)


def measured_layer_removal(model: nn.Module, arch: EncoderArch, batches: list[dict], remove: int, labeled: bool,
                           softmax: bool, output: str, progress=None) -> tuple[list[int], list[dict]]:
    """The ``remove`` layers to take out, chosen greedily by the criterion MEASURED with them bypassed on the
    calibration batches: each round bypasses every layer still in, one at a time, and takes out the one that
    costs least. A layer's mask going from 1 to 0 is far outside the quadratic range the mask Fisher estimates
    (it ranked a layer 1.6x costlier than the median as the least important on a 4-layer test model), and with
    L layers measuring costs only about L x ``remove`` forward passes. Returns (removed, one record per round:
    {"removed", "losses" by layer index})."""
    dims = Dims.of(model.config, arch)
    keep = torch.ones(dims.layers)
    removed, rounds = [], []
    passes, done = sum(dims.layers - r for r in range(remove)), 0  # one per layer still in, each round
    with torch.no_grad():
        references = [None] * len(batches) if labeled else [model_output(model, b, output) for b in batches]
        for _ in range(remove):
            losses = {}
            for i in (int(j) for j in keep.nonzero().flatten()):
                trial = keep.clone()
                trial[i] = 0
                losses[i] = _bypass_loss(model, arch, dims, batches, references, trial, labeled, softmax, output)
                done += 1
                if progress:
                    progress("Measuring layer removal", done, passes)
            best = min(losses, key=lambda i: (losses[i], i))
            keep[best] = 0
            removed.append(best)
            rounds.append({"removed": best, "losses": losses})
    return removed, rounds


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[scores.flatten().argsort(descending=True)[:n]] = True
    return keep.view(scores.shape)


def search_by_flops(head_scores: torch.Tensor, neuron_scores: torch.Tensor, head_cost: int, neuron_cost: int,
                    budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Kwon et al. Algorithm 1: for every possible number of kept heads, spend the rest of the budget on the
    best neurons; keep the combination with the largest total importance. Costs are uniform across layers
    (every head has the same size; every neuron too), which is what makes this exact for the diagonal."""
    h_sorted = torch.cat([torch.zeros(1), head_scores.flatten().sort(descending=True).values.cumsum(0).double()])
    n_sorted = torch.cat([torch.zeros(1), neuron_scores.flatten().sort(descending=True).values.cumsum(0).double()])
    best, best_nh, best_nn = -math.inf, 0, 0
    for nh in range(h_sorted.numel()):
        left = budget - nh * head_cost
        if left < 0:
            break
        nn_ = min(n_sorted.numel() - 1, left // neuron_cost)
        total = float(h_sorted[nh] + n_sorted[nn_])
        if total > best:
            best, best_nh, best_nn = total, nh, nn_
    return _top(head_scores, best_nh), _top(neuron_scores, best_nn)


def search_by_ratio(head_scores: torch.Tensor, neuron_scores: torch.Tensor, heads: float, ffn: float,
                    model_layers: int | None = None):
    """Remove the given fractions of all heads and of all neurons, least important first, across layers.

    ``model_layers``: the model's layer count when the scores hold only the kept layers' rows; the fractions
    then count the removed layers' heads and neurons too (as ``--sparsity`` counts their FLOPs), so what the
    removed layers took already is not taken again from the kept ones."""
    layers = model_layers or head_scores.shape[0]
    return (_top(head_scores, min(head_scores.numel(), round(layers * head_scores.shape[1] * (1 - heads)))),
            _top(neuron_scores, min(neuron_scores.numel(), round(layers * neuron_scores.shape[1] * (1 - ffn)))))


@dataclass
class Choice:
    """What to keep: the original indices of the kept layers, and per original layer the kept heads and neurons
    (all False in a removed layer's row), with the diagonal Fisher estimate of the loss increase."""

    layers: list[int]
    heads: torch.Tensor  # (L, H) bool
    neurons: torch.Tensor  # (L, N) bool
    estimated_loss: float


def search_with_layers(head_scores: torch.Tensor, neuron_scores: torch.Tensor, layer_scores: torch.Tensor,
                       remove: int, search, removed: list[int] | None = None) -> Choice:
    """Remove the ``remove`` least important layers (by their own mask's score, or the ``removed`` given:
    :func:`measured_layer_removal`'s), then let ``search(head_scores, neuron_scores)`` (one of the searches
    above, on the kept layers' rows) choose the heads and neurons kept in them. The estimated loss sums the
    scores of every removed layer and of every head and neuron removed from a kept layer: a removed layer's heads
    and neurons are counted in its own score."""
    keep = torch.ones(layer_scores.numel(), dtype=torch.bool)
    keep[removed if removed is not None else layer_scores.argsort(stable=True)[:remove]] = False
    keep_h, keep_n = torch.zeros_like(head_scores, dtype=torch.bool), torch.zeros_like(neuron_scores, dtype=torch.bool)
    keep_h[keep], keep_n[keep] = search(head_scores[keep], neuron_scores[keep])
    kept = keep[:, None]
    loss = layer_scores[~keep].sum() + head_scores[kept & ~keep_h].sum() + neuron_scores[kept & ~keep_n].sum()
    return Choice(keep.nonzero().flatten().tolist(), keep_h, keep_n, float(loss))


def search_depth(head_scores: torch.Tensor, neuron_scores: torch.Tensor, layer_scores: torch.Tensor,
                 search) -> list[Choice]:
    """The depth search's candidates: 0 to L-1 whole layers removed, each followed by ``search`` in the layers
    left (with a FLOPs search, under the same total budget, so removing a layer frees budget for the heads and
    neurons of the others). The caller keeps the smallest estimated loss."""
    return [search_with_layers(head_scores, neuron_scores, layer_scores, n, search)
            for n in range(layer_scores.numel())]


def rearrange(grads: torch.Tensor, keep: torch.Tensor, max_swaps: int = 200) -> torch.Tensor:
    """Mask rearrangement for one layer: with the same number kept, greedily swap a pruned element in and a kept
    one out while that lowers 1_P^T F 1_P, the block-diagonal Fisher estimate of the loss increase from pruning
    the set P (F = sum_s g_s g_s^T over this layer's elements)."""
    keep = keep.clone()
    if keep.all() or not keep.any():
        return keep
    g = grads.double()
    fisher = g.T @ g
    diag = fisher.diagonal()
    v = fisher[:, ~keep].sum(1)  # F 1_P
    for _ in range(max_swaps):
        pruned, kept = (~keep).nonzero().flatten(), keep.nonzero().flatten()
        # moving i out of P and j into P changes the objective by
        # F_ii + F_jj - 2 F_ij - 2 (F 1_P)_i + 2 (F 1_P)_j
        delta = (diag[pruned] - 2 * v[pruned])[:, None] + (diag[kept] + 2 * v[kept])[None, :] \
            - 2 * fisher[pruned][:, kept]
        flat = int(delta.argmin())
        i, j = pruned[flat // kept.numel()], kept[flat % kept.numel()]
        objective = float(v[~keep].sum())
        if float(delta.flatten()[flat]) >= -1e-9 * max(objective, 1e-30):
            break
        keep[i], keep[j] = True, False
        v += fisher[:, j] - fisher[:, i]
    return keep


def rearrange_all(grads_h: torch.Tensor, grads_n: torch.Tensor, keep_h: torch.Tensor, keep_n: torch.Tensor):
    return (torch.stack([rearrange(grads_h[:, i], keep_h[i]) for i in range(keep_h.shape[0])]),
            torch.stack([rearrange(grads_n[:, i], keep_n[i]) for i in range(keep_n.shape[0])]))
