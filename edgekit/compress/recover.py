"""Recovering accuracy without a training run.

``refit_layers`` is Kwon et al.'s "mask tuning" generalised from one scale per head/neuron to the whole
remaining output projection: layer by layer, the attention output projection and then the FFN down-projection
are re-fitted by ridge least squares so that the residual sum entering each LayerNorm matches the ORIGINAL
model's, while the inputs come from the PRUNED model (earlier layers already re-fitted), so each layer also
corrects the drift of the layers before it. A kept layer is matched to the original layer at its ORIGINAL
index, whose inputs went through every original layer, removed ones included: the layer after a removed one
thereby learns to stand in for it as far as its output projections can. Where the last layers are removed no
layer follows, so the last kept layer's FFN is matched to the original's final residual sum instead (measured
on a 4-layer test model without its last layer: the logit error to the original fell 4x, against none when it
was matched to its own index). Hand-written: neither torch-pruning nor NNCF has a post-training
layer-wise reconstruction for pruned transformers.

Overfitting guard: a full projection has many more free parameters than Kwon's per-head scales, and 256
sentences give only a few thousand tokens. Every fifth calibration sample is held out; the ridge strength is
chosen on it from a small grid, and the original weights are kept when no candidate beats them there.

``distill`` is the optional short distillation from the original model on the unlabeled calibration text.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from edgekit.compress.prune_arch import BiasOnly, EncoderArch, encoder_layers, get_module, requires_grad

RIDGES = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # relative to the mean variance of the inputs
HOLDOUT_EVERY = 5


class _Stop(Exception):
    pass


class _Stats:
    """Sufficient statistics of a linear fit y ~ W x + b over token rows, for fit rows and held-out rows."""

    def __init__(self):
        self.parts: dict[bool, list] = {}

    def add(self, x: torch.Tensor, y: torch.Tensor, held: torch.Tensor) -> None:
        for h in (False, True):
            xs, ys = x[held == h].double(), y[held == h].double()
            xs = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], 1)  # bias column last
            new = [xs.T @ xs, xs.T @ ys, (ys * ys).sum()]
            old = self.parts.get(h)
            self.parts[h] = new if old is None else [a + b for a, b in zip(old, new)]

    def error(self, w: torch.Tensor, held: bool) -> float:
        """Squared error of prediction X w on the chosen rows, relative to the target's energy."""
        a, b, yy = self.parts[held]
        return float(((w * (a @ w)).sum() - 2 * (w * b).sum() + yy) / yy.clamp_min(1e-30))

    def solve(self, ridge: float, held_in: bool) -> torch.Tensor:
        a, b, _ = self.parts[False]
        if held_in:
            a, b = a + self.parts[True][0], b + self.parts[True][1]
        k = a.shape[0] - 1
        reg = torch.zeros(k + 1, dtype=a.dtype)
        if k:
            n = a[k, k]
            mean = a[:k, k] / n
            scale = (a[:k, :k].diagonal() / n - mean**2).mean().clamp_min(1e-12)  # centred: the bias is not shrunk
            reg[:k] = ridge * scale * n
        # Ridge makes the normal equations symmetric positive definite, so Cholesky solves them; measured here
        # for a 1537-wide FFN fit: 0.17 s, against 11 s for torch.linalg.lstsq (QR with column pivoting), which
        # stays the fallback for a system that is still not positive definite.
        a = a + torch.diag(reg)
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b, factor)
        return torch.linalg.lstsq(a, b).solution


def _weights(linear: nn.Module) -> torch.Tensor:
    """The module as one (in + 1, out) matrix, bias last, matching the statistics' layout."""
    bias = linear.bias.detach().double()[None, :]
    if isinstance(linear, BiasOnly):
        return bias
    return torch.cat([linear.weight.detach().double().T, bias], 0)


def _inputs(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x[:, :0] if isinstance(linear, BiasOnly) else x  # a bypass ignores its input's values


def _assign(linear: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        linear.bias.copy_(w[-1])
        if not isinstance(linear, BiasOnly):
            linear.weight.copy_(w[:-1].T)


def _fit(linear: nn.Module, stats: _Stats) -> dict:
    held = bool(stats.parts[True][0][-1, -1] > 0)  # fewer than HOLDOUT_EVERY samples: judge on the fit rows
    before = stats.error(_weights(linear), held=held)
    best, best_err = None, before
    for ridge in RIDGES:
        err = stats.error(stats.solve(ridge, held_in=False), held=held)
        if err < best_err:
            best, best_err = ridge, err
    if best is not None:
        _assign(linear, stats.solve(best, held_in=True).to(linear.bias.dtype))
    return {"error_before": before, "error_after": best_err, "ridge": best}


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module], pre: set[str]):
    """Record each module's input (names in ``pre``) or output (the others) into the yielded dict."""
    seen, handles = {}, []
    for name, module in modules.items():
        if name in pre:
            handles.append(module.register_forward_pre_hook(lambda _m, a, n=name: seen.__setitem__(n, a[0].detach())))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, o, n=name: seen.__setitem__(n, o.detach())))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _layer_inputs(model: nn.Module, arch: EncoderArch, batches: list[dict]) -> list[tuple]:
    """For each batch, the (hidden_states, other args, kwargs) the encoder passes to its first layer."""
    first, caught = encoder_layers(model, arch)[0], []

    def hook(_m, args, kwargs):
        caught.append((args[0].detach(), args[1:], kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    return caught


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def _run(layer: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = layer(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def refit_layers(original: nn.Module, pruned: nn.Module, arch: EncoderArch, batches: list[dict],
                 progress=None, kept: list[int] | None = None) -> list[dict]:
    """Re-fit, layer by layer, both output projections of every pruned layer; returns per-layer held-out errors
    (relative squared error of the residual sums, before and after), one entry per pruned layer: empty for a
    layer left as it was with nothing changed before it, which computes exactly the original's outputs.

    ``kept``: the original index of each of the pruned model's layers, when whole layers were removed."""
    caught = _layer_inputs(pruned, arch, batches)
    x_orig = [c[0] for c in caught]
    x_pruned = list(x_orig)  # entries are replaced as layers run, never changed in place
    valid = [b["attention_mask"].bool() for b in batches]
    held, start = [], 0
    for v in valid:  # every HOLDOUT_EVERY-th sample is held out, all its tokens together
        ids = torch.arange(start, start + v.shape[0])
        held.append(((ids % HOLDOUT_EVERY) == HOLDOUT_EVERY - 1)[:, None].expand_as(v)[v])
        start += v.shape[0]
    results = []
    orig_layers, pruned_layers = encoder_layers(original, arch), encoder_layers(pruned, arch)
    position = {i: p for p, i in enumerate(range(len(orig_layers)) if kept is None else kept)}
    last = max(position)
    untouched = True  # up to the first removed or sliced layer the pruned model computes what the original does
    # Removed layers after the last kept one are run by its stand-in fit (stands_in below), not again here.
    for i, lo in enumerate(orig_layers[:last + 1]):
        if i not in position:  # removed: only the original runs it, and the next kept layer's targets hold it
            untouched = False
            x_orig = [_run(lo, x, args, kwargs) for x, (_, args, kwargs) in zip(x_orig, caught)]
            continue
        lp = pruned_layers[position[i]]
        stands_in = i == last and last < len(orig_layers) - 1
        untouched = untouched and not stands_in and _same(lo, lp)
        if untouched:  # same input, same weights: nothing to fit (and a 1536-wide FFN fit costs seconds)
            x_orig = [_run(lo, x, args, kwargs) for x, (_, args, kwargs) in zip(x_orig, caught)]
            x_pruned = list(x_orig)
            results.append({})
            if progress:
                progress("Least-squares re-fit", position[i] + 1, len(pruned_layers))
            continue
        attn_out, ffn_out = get_module(lp, arch.attn_out), get_module(lp, arch.ffn_out)
        attn_stats, ffn_targets = _Stats(), []
        for b, (_, args, kwargs) in enumerate(caught):
            with _capture({"attn": get_module(lo, arch.attn_norm), "ffn": get_module(lo, arch.ffn_norm)},
                          {"attn", "ffn"}) as target:
                x_next = _run(lo, x_orig[b], args, kwargs)
            with _capture({"ctx": attn_out}, {"ctx"}) as seen:
                _run(lp, x_pruned[b], args, kwargs)
            v = valid[b]
            attn_stats.add(_inputs(attn_out, seen["ctx"][v]), (target["attn"] - x_pruned[b])[v], held[b])
            ffn_target = target["ffn"]
            if stands_in:  # no kept layer follows the removed ones at the end: this FFN stands in for them
                for later in orig_layers[i + 1:]:
                    with _capture({"ffn": get_module(later, arch.ffn_norm)}, {"ffn"}) as end:
                        x_next = _run(later, x_next, args, kwargs)
                    ffn_target = end["ffn"]
            ffn_targets.append(ffn_target[v])
            x_orig[b] = x_next
        attn = _fit(attn_out, attn_stats)
        ffn_stats = _Stats()
        for b, (_, args, kwargs) in enumerate(caught):
            with _capture({"act": ffn_out, "res": get_module(lp, arch.attn_norm)}, {"act"}) as seen:
                _run(lp, x_pruned[b], args, kwargs)
            v = valid[b]
            ffn_stats.add(_inputs(ffn_out, seen["act"][v]), ffn_targets[b] - seen["res"][v], held[b])
        ffn = _fit(ffn_out, ffn_stats)
        for b, (_, args, kwargs) in enumerate(caught):
            x_pruned[b] = _run(lp, x_pruned[b], args, kwargs)
        results.append({"attention": attn, "ffn": ffn})
        if progress:
            progress("Least-squares re-fit", position[i] + 1, len(pruned_layers))
    return results


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, softmax: bool) -> torch.Tensor:
    if softmax:
        per = nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                   reduction="none").sum(-1)
    else:
        per = (student - teacher).pow(2).mean(-1)
    if per.dim() == 2:  # per token: padding does not count
        mask = mask.to(per.dtype)
        return (per * mask).sum() / mask.sum()
    return per.mean()


def distill(original: nn.Module, pruned: nn.Module, batches: list[dict], steps: int, lr: float, softmax: bool,
            output: str, progress=None) -> dict:
    """A short distillation on unlabeled text: KL to the original's logits (classifiers) or MSE to its last
    hidden states (feature extraction), over real tokens only. Dropout stays off: a few hundred steps on a
    few hundred sentences are too few for its noise to pay off. If the loss over the calibration set ends
    higher than it started (learning rate too high for this model), the weights from before are restored."""
    from edgekit.compress.importance import model_output

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(_distill_loss(model_output(pruned, b, output), t, b["attention_mask"], softmax))
                       for b, t in zip(batches, teacher)) / len(batches)

    with torch.no_grad():
        teacher = [model_output(original, b, output) for b in batches]
    before = mean_loss()
    saved = copy.deepcopy(pruned.state_dict())
    opt = torch.optim.AdamW(pruned.parameters(), lr=lr, weight_decay=0.0)
    with requires_grad(pruned, True):
        for step in range(steps):
            b = step % len(batches)
            loss = _distill_loss(model_output(pruned, batches[b], output), teacher[b], batches[b]["attention_mask"],
                                 softmax)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if progress:
                progress("Distillation", step + 1, steps)
    after = mean_loss()
    reverted = after >= before
    if reverted:
        pruned.load_state_dict(saved)
    return {"steps": steps, "lr": lr, "loss_before": before, "loss_after": after, "reverted": reverted}
