"""What structured pruning needs to know about each encoder family, in one declarative table.

An entry names, relative to one encoder layer, the modules that carry attention heads and FFN neurons and the
LayerNorms whose *input* is the residual sum that the least-squares re-fit matches. Everything else (the
slicing, the FLOP count, rebuilding a pruned model for reload) is written once against these names.

Why slicing by hand rather than torch-pruning's DepGraph: the coupled groups in these encoders are fixed and
known (q/k/v rows + output-projection columns per head; FFN-in rows + FFN-out columns per neuron), transformers
already slices heads natively (``PreTrainedModel.prune_heads``, recorded in ``config.pruned_heads``, so the
head structure reloads natively), and the reload must rebuild the exact shapes from a small JSON without
tracing the graph again. DepGraph would add a dependency and a trace to obtain the same index lists.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class EncoderArch:
    layers: str  # the ModuleList of encoder layers, relative to model.base_model
    attn_core: str  # computes attention; replaced by a bypass when a layer keeps no head
    attn_out: str  # attention output projection: its input is the concatenated per-head contexts
    attn_norm: str  # LayerNorm whose input is residual + attention output (post-LN encoders)
    ffn_in: str  # FFN up-projection: one output row per neuron
    ffn_out: str  # FFN down-projection: one input column per neuron
    ffn_norm: str  # LayerNorm whose input is residual + FFN output
    n_layers: str  # config attribute names
    n_heads: str
    hidden: str
    ffn_size: str


BERT = EncoderArch(
    layers="encoder.layer", attn_core="attention.self", attn_out="attention.output.dense",
    attn_norm="attention.output.LayerNorm", ffn_in="intermediate.dense", ffn_out="output.dense",
    ffn_norm="output.LayerNorm", n_layers="num_hidden_layers", n_heads="num_attention_heads",
    hidden="hidden_size", ffn_size="intermediate_size",
)
DISTILBERT = EncoderArch(
    layers="transformer.layer", attn_core="attention", attn_out="attention.out_lin", attn_norm="sa_layer_norm",
    ffn_in="ffn.lin1", ffn_out="ffn.lin2", ffn_norm="output_layer_norm", n_layers="n_layers", n_heads="n_heads",
    hidden="dim", ffn_size="hidden_dim",
)

# config.model_type -> layout. MiniLM checkpoints are model_type "bert"; RoBERTa-likes share BERT's modules.
ARCHS: dict[str, EncoderArch] = {
    "bert": BERT,
    "roberta": BERT,
    "xlm-roberta": BERT,
    "camembert": BERT,
    "electra": BERT,
    "distilbert": DISTILBERT,
}


@contextlib.contextmanager
def requires_grad(model, flag: bool):
    """Set every parameter's requires_grad for a block, then restore each one as it was."""
    before = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(flag)
    try:
        yield
    finally:
        for p, r in zip(model.parameters(), before):
            p.requires_grad_(r)


def get_arch(model_type: str) -> EncoderArch:
    try:
        return ARCHS[model_type]
    except KeyError:
        raise EdgekitError(
            f"pruning does not support model type '{model_type}'",
            f"prune one of {', '.join(sorted(ARCHS))}, or skip the prune stage for this model",
        ) from None


@dataclass(frozen=True)
class Dims:
    layers: int
    heads: int
    head_size: int
    hidden: int
    ffn: int

    @classmethod
    def of(cls, config, arch: EncoderArch) -> "Dims":
        heads, hidden = getattr(config, arch.n_heads), getattr(config, arch.hidden)
        return cls(getattr(config, arch.n_layers), heads, hidden // heads, hidden, getattr(config, arch.ffn_size))


def layer_macs(heads: int, neurons: int, dims: Dims, seq_len: int) -> int:
    """Multiply-accumulates of one encoder layer for one sequence of ``seq_len`` tokens.

    A head costs its share of the four projections (q, k, v in: 3*hidden*head_size; o out: head_size*hidden)
    per token, plus the score (Q K^T) and context (P V) matmuls: 2*seq_len*head_size per token. A neuron costs
    hidden MACs in the up- and hidden in the down-projection: 2*hidden per token. Biases, LayerNorm, softmax
    and GELU are left out (linear in seq_len and hidden, well under 1% for real sizes). FLOPs = 2 * MACs.
    """
    per_head = 4 * dims.hidden * dims.head_size + 2 * seq_len * dims.head_size
    return seq_len * (heads * per_head + neurons * 2 * dims.hidden)


def head_macs(dims: Dims, seq_len: int) -> int:
    return layer_macs(1, 0, dims, seq_len)


def neuron_macs(dims: Dims, seq_len: int) -> int:
    return layer_macs(0, 1, dims, seq_len)


# ---- module access ---------------------------------------------------------------------------------------


def get_module(root: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        root = getattr(root, name)
    return root


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, module)


def encoder_layers(model: nn.Module, arch: EncoderArch) -> nn.ModuleList:
    return get_module(model.base_model, arch.layers)


class BiasOnly(nn.Module):
    """An output projection with no inputs left: it contributes its bias alone (shape taken from its input)."""

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is the residual-width tensor routed through the bypass; only its shape is used.
        return self.bias.expand(*x.shape[:-1], self.bias.shape[0])


class NoHeads(nn.Module):
    """Attention of a layer that keeps no head: returns (out(x), None) without any matmul.

    transformers cannot run a layer with zero heads (its reshapes to (batch, -1, 0, head_size) fail), so the
    attention core is bypassed. Where the output projection lives inside the core (DistilBERT), it is a child
    of this module under its original name, so the state-dict keys keep their usual names.
    """

    def __init__(self, out_name: str | None = None):
        super().__init__()
        self.out_name = out_name

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
        return (getattr(self, self.out_name)(x) if self.out_name else x), None


def _headless(layer: nn.Module, arch: EncoderArch, bias: torch.Tensor) -> None:
    inner = arch.attn_out[len(arch.attn_core) + 1:] if arch.attn_out.startswith(arch.attn_core + ".") else None
    set_module(layer, arch.attn_core, NoHeads(inner))
    set_module(layer, arch.attn_out, BiasOnly(bias))


def _ffnless(layer: nn.Module, arch: EncoderArch, bias: torch.Tensor) -> None:
    set_module(layer, arch.ffn_in, nn.Identity())  # the activation then runs on a residual-width tensor
    set_module(layer, arch.ffn_out, BiasOnly(bias))


@contextlib.contextmanager
def quiet_empty_init():
    """A layer that keeps no head briefly holds zero-width q/k/v Linears (before the bypass replaces them);
    torch warns that initializing them is a no-op, which is expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        yield


def slice_model(model: nn.Module, arch: EncoderArch, keep_heads: list[list[int]],
                keep_neurons: list[list[int]]) -> None:
    """Physically remove every head and neuron not kept (indices into the original layer), in place."""
    from transformers.pytorch_utils import prune_linear_layer

    dims = Dims.of(model.config, arch)
    to_prune = {i: [h for h in range(dims.heads) if h not in set(kept)] for i, kept in enumerate(keep_heads)}
    with quiet_empty_init():  # native, and recorded in config.pruned_heads:
        model.prune_heads({i: heads for i, heads in to_prune.items() if heads})
    for i, layer in enumerate(encoder_layers(model, arch)):
        if not keep_heads[i]:
            _headless(layer, arch, get_module(layer, arch.attn_out).bias)
        kept = sorted(keep_neurons[i])
        if not kept:
            _ffnless(layer, arch, get_module(layer, arch.ffn_out).bias)
        elif len(kept) < dims.ffn:
            index = torch.tensor(kept, dtype=torch.long)
            set_module(layer, arch.ffn_in, prune_linear_layer(get_module(layer, arch.ffn_in), index, dim=0))
            set_module(layer, arch.ffn_out, prune_linear_layer(get_module(layer, arch.ffn_out), index, dim=1))


def remove_layers(model: nn.Module, arch: EncoderArch, kept: list[int]) -> None:
    """Keep only the encoder layers ``kept`` (original indices, ascending), in place.

    The config's layer count follows the ModuleList (transformers sizes its head masks by it, and a reload builds
    that many layers), and heads already pruned are renumbered to their layers' new positions."""
    layers = encoder_layers(model, arch)
    set_module(model.base_model, arch.layers, nn.ModuleList([layers[i] for i in kept]))
    setattr(model.config, arch.n_layers, len(kept))
    position = {old: new for new, old in enumerate(kept)}
    model.config.pruned_heads = {position[int(k)]: v for k, v in (model.config.pruned_heads or {}).items()
                                 if int(k) in position}


def shape_like_pruned(model: nn.Module, arch: EncoderArch, layers: list[dict]) -> None:
    """Give a freshly built model (heads already pruned natively from config.pruned_heads) the pruned FFN sizes
    and bypasses recorded in edgekit_pruning.json, so that the saved state dict loads strictly."""
    dims = Dims.of(model.config, arch)
    for layer, spec in zip(encoder_layers(model, arch), layers):
        if not spec["heads_kept"]:
            _headless(layer, arch, torch.zeros(dims.hidden))
        n = spec["neurons_kept"]
        if n == 0:
            _ffnless(layer, arch, torch.zeros(dims.hidden))
        elif n != dims.ffn:
            set_module(layer, arch.ffn_in, nn.Linear(dims.hidden, n))
            set_module(layer, arch.ffn_out, nn.Linear(n, dims.hidden))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
