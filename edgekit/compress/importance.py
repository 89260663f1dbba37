"""Which heads and neurons to keep: Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers".

1. Mask gradients. Every head and FFN neuron gets a multiplicative mask variable m = 1 (applied to the input of
   the output projections, so it works the same for eager and SDPA attention). One backward pass per batch
   gives each sample's gradient g_s = dL_s/dm (the masks carry a batch dimension, so per-sample gradients
   come out of a single backward). The Fisher information sum_s g_s g_s^T approximates the loss increase
   of zeroing a mask to second order; its diagonal is the importance score.
2. Mask search (their Algorithm 1): keep the set with the largest summed importance under a FLOPs budget,
   trading heads against neurons globally, so the per-layer budgets come out different.
3. Mask rearrangement: within each layer, swap kept and pruned elements while that lowers the
   block-diagonal Fisher estimate of the loss increase (the diagonal alone ignores correlated elements).

Kwon-style Fisher importance and the search are hand-written: torch-pruning and NNCF offer magnitude/Taylor
importance on parameters and training-based pruning, not Fisher mask importance under a FLOPs constraint.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from edgekit.compress.prune_arch import Dims, EncoderArch, encoder_layers, get_module, requires_grad

LABELED = "fisher-labels"
RECONSTRUCTION = "fisher-reconstruction"


@contextlib.contextmanager
def mask_hooks(model: nn.Module, arch: EncoderArch, dims: Dims, masks: dict):
    """While active, scale each head's context and each neuron's activation by masks['heads'][:, layer, i]
    and masks['neurons'][:, layer, i] (per sample)."""
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

    for i, layer in enumerate(encoder_layers(model, arch)):
        handles.append(get_module(layer, arch.attn_out).register_forward_pre_hook(heads_hook(i)))
        handles.append(get_module(layer, arch.ffn_out).register_forward_pre_hook(neurons_hook(i)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def model_output(model: nn.Module, batch: dict, output: str) -> torch.Tensor:
    """The task's output (``Task.output``: logits or last_hidden_state) for a batch; labels are not inputs."""
    return getattr(model(**{k: v for k, v in batch.items() if k != "labels"}), output)


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
        return nn.functional.cross_entropy(output.reshape(-1, output.shape[-1]), batch["labels"].reshape(-1),
                                           ignore_index=-100, reduction="sum")  # per token: -100 is ignored
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
                   output: str, seed: int = 0, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the criterion w.r.t. the head masks (S, L, H) and neuron masks (S, L, N)."""
    dims = Dims.of(model.config, arch)
    generator = torch.Generator().manual_seed(seed)
    grads_h, grads_n = [], []
    with requires_grad(model, False):  # only the masks need gradients
        for step, batch in enumerate(batches):
            b = batch["input_ids"].shape[0]
            masks = {"heads": torch.ones(b, dims.layers, dims.heads, requires_grad=True),
                     "neurons": torch.ones(b, dims.layers, dims.ffn, requires_grad=True)}
            with torch.enable_grad(), mask_hooks(model, arch, dims, masks):
                loss = _surrogate_loss(model_output(model, batch, output), batch, labeled, softmax, generator)
                gh, gn = torch.autograd.grad(loss, [masks["heads"], masks["neurons"]])
            grads_h.append(gh)
            grads_n.append(gn)
            if progress:
                progress("Fisher importance", step + 1, len(batches))
    return torch.cat(grads_h), torch.cat(grads_n)


# ---- mask search -----------------------------------------------------------------------------------------


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


def search_by_ratio(head_scores: torch.Tensor, neuron_scores: torch.Tensor, heads: float, ffn: float):
    """Remove the given fractions of all heads and of all neurons, least important first, across layers."""
    return (_top(head_scores, round(head_scores.numel() * (1 - heads))),
            _top(neuron_scores, round(neuron_scores.numel() * (1 - ffn))))


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
