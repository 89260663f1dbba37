"""Prune stage: post-training structured pruning of BERT-family encoders (Kwon et al. 2022), on a CPU in minutes.

checkpoint folder + calibration text -> Fisher importance of every head, FFN neuron and whole layer ->
FLOPs-constrained global mask search -> mask rearrangement -> layers, heads and neurons PHYSICALLY removed
(fewer and smaller matmuls, on any dense runtime) -> least-squares re-fit of the output projections ->
optional short distillation -> a new checkpoint folder that ``edgekit.checkpoint.load_model`` reloads and that
exports to ONNX.

On disk, the layer count and heads are native (``config.json``: the layer count, ``pruned_heads`` renumbered to
the kept layers' positions, applied by transformers when the model is built); per-layer FFN sizes are not
expressible in a transformers config, so they are recorded in ``edgekit_pruning.json`` beside the weights,
with the original index of every kept layer, and ``edgekit.checkpoint.load_pruned_model`` rebuilds the shapes.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pydantic import model_validator

from edgekit.version import __version__
from edgekit.artifacts import staged_output
from edgekit.checkpoint import PRUNING_FILE, PRUNING_FORMAT, PRUNING_SCHEMA_VERSION, Checkpoint, load_model, open_checkpoint
from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option, trust_remote_code_option
from edgekit.tasks import detect_task, is_decoder
from edgekit.reports import RenderedReport, SCHEMA_VERSION, Section

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


class PruneConfig(StageConfig):
    # Either a FLOPs target (heads and neurons traded against each other) or explicit head / FFN ratios.
    sparsity: Optional[float] = option(None, "Fraction of encoder FLOPs (and parameters) to remove, e.g. 0.4.")
    heads: Optional[float] = option(None, "Or: fraction of all attention heads to remove (ranked globally).")
    ffn: Optional[float] = option(None, "And/or: fraction of all FFN neurons to remove (ranked globally).")
    # Short inputs pay per layer and per op more than per FLOP: whole layers go first, the rest of a target is
    # then spent in the layers left (a --sparsity or --heads/--ffn fraction counts the removed layers too).
    layers: Optional[int] = option(None, "Remove this many whole encoder layers (the least costly, measured with "
                                         "each bypassed on the calibration data, one at a time); alone, or with "
                                         "--sparsity or --heads/--ffn.")
    depth: bool = option(False, "With --sparsity: the FLOPs budget may spend itself on whole layers (0 to L-1 "
                                "removed are tried; the smallest estimated loss wins).", flag="--depth/--no-depth")
    # Used when prune() is given no calibration_data (recipes, compress: default quantize.calibration_data).
    calibration_data: Optional[str] = option(
        None, "In-domain examples to rank layers, heads and neurons on (TSV/CSV/JSONL/Parquet; labels optional).",
        path=True)
    calibration_samples: int = option(256, "Examples of the calibration text to use.", ge=1)
    seq_len: int = option(128, "Sequence length the FLOPs are counted and budgeted at.", ge=1)
    max_length: int = option(128, "Truncation of the calibration text, in tokens.", ge=1, cli=False)
    batch_size: int = option(32, "Batch size of the importance and re-fit passes.", ge=1, cli=False)
    use_labels: bool = option(True, "Rank by the task loss when the data has labels; --no-labels: by reconstruction "
                              "of the original outputs.", flag="--labels/--no-labels")
    rearrange: bool = option(True, "Kwon's mask rearrangement step.", flag="--rearrange/--no-rearrange")
    refit: bool = option(True, "Least-squares re-fit of the pruned layers' output projections.",
                         flag="--refit/--no-refit")
    recover_steps: int = option(0, "Then distil from the original for N steps on the calibration text.")
    recover_lr: float = option(5e-5, "Learning rate of the distillation steps.", gt=0)
    seed: int = option(0, "Seed of the calibration sample.", cli=False)
    trust_remote_code: bool = trust_remote_code_option()

    @model_validator(mode="after")
    def _one_target(self):
        if self.depth and self.sparsity is None:
            raise EdgekitError("--depth needs --sparsity", "it lets the FLOPs budget of --sparsity remove whole layers")
        if self.depth and self.layers is not None:
            raise EdgekitError("--depth chooses how many layers to remove, so it cannot be combined with --layers",
                               "drop one of the two")
        if self.sparsity is None and self.heads is None and self.ffn is None and self.layers is None:
            raise EdgekitError("no pruning target was given",
                               "pass --sparsity (e.g. 0.4), --heads and/or --ffn, or --layers N")
        if self.layers is not None and self.layers < 1:
            raise EdgekitError(f"--layers must be at least 1, not {self.layers}",
                               "it counts the whole encoder layers to remove, e.g. --layers 2")
        if self.sparsity is not None:
            if self.heads is not None or self.ffn is not None:
                raise EdgekitError("--sparsity cannot be combined with --heads/--ffn",
                                   "give either a FLOPs sparsity or explicit head/FFN ratios")
            if not 0 < self.sparsity < 1:
                raise EdgekitError(f"sparsity must be between 0 and 1 (exclusive), not {self.sparsity}",
                                   "e.g. --sparsity 0.4 removes 40% of the encoder FLOPs")
        for name in ("heads", "ffn"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise EdgekitError(f"--{name} must be a fraction in [0, 1), not {value}",
                                   f"e.g. --{name} 0.5 removes half of them")
        if self.recover_steps < 0:
            raise EdgekitError(f"recover_steps must be 0 or more, not {self.recover_steps}", "use 0 to skip it")
        return self


@dataclass
class LayerReport:
    layer: int  # the index in the original model
    heads_kept: int
    heads_total: int
    neurons_kept: int
    neurons_total: int
    flops_before: int
    flops_after: int
    refit: dict | None = None  # held-out relative error of each re-fitted projection, before/after
    removed: bool = False  # the whole layer (then nothing is kept and flops_after is 0)
    fisher: float | None = None  # the diagonal Fisher of the layer's mask: the estimated loss of removing it


@dataclass
class PruneReport(RenderedReport):
    source: str
    output: str
    model_type: str
    task: str
    criterion: str  # fisher-labels | fisher-reconstruction
    calibration_samples: int
    seq_len: int
    params_before: int
    params_after: int
    encoder_params_before: int
    encoder_params_after: int
    flops_before: int  # encoder FLOPs (2 * MACs) for one sequence of seq_len tokens
    flops_after: int
    flops_reduction: float
    params_reduction: float
    layers: list[LayerReport]
    recover: dict | None
    seconds: float
    stage_seconds: dict
    config: dict
    environment: dict = field(default_factory=dict)
    removed_layers: list[int] = field(default_factory=list)  # original indices
    # --depth: {"chosen": layers removed, "candidates": [{layers_removed, removed, estimated_loss, flops_after}]}
    depth: dict | None = None
    # --layers: per round, the layer taken out and the measured loss with each layer still in bypassed
    layer_removal: list | None = None
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        def share(before, after):
            return f"{1 - after / max(before, 1):.1%}"

        summary = Section(f"Prune ({d['criterion']}, {d['calibration_samples']} calibration samples)",
                          ["", "before", "after", "removed"], [
            [f"encoder GFLOPs @ {d['seq_len']} tokens", f"{d['flops_before'] / 1e9:.3f}", f"{d['flops_after'] / 1e9:.3f}",
             f"{d['flops_reduction']:.1%}"],
            ["parameters (model)", f"{d['params_before']:,}", f"{d['params_after']:,}", f"{d['params_reduction']:.1%}"],
            ["parameters (encoder)", f"{d['encoder_params_before']:,}", f"{d['encoder_params_after']:,}",
             share(d["encoder_params_before"], d["encoder_params_after"])],
            ["encoder layers", len(d["layers"]), sum(not lr.get("removed") for lr in d["layers"]),
             share(len(d["layers"]), sum(not lr.get("removed") for lr in d["layers"]))]])
        rows = []
        for lr in d["layers"]:
            r = lr.get("refit") or {}
            err = lambda k: f"{r[k]['error_before']:.3g} -> {r[k]['error_after']:.3g}" if k in r else "-"  # noqa: E731
            fisher = f"{lr['fisher']:.3g}" if lr.get("fisher") is not None else "-"
            kept = ["removed", "removed"] if lr.get("removed") else [
                f"{lr['heads_kept']}/{lr['heads_total']}", f"{lr['neurons_kept']}/{lr['neurons_total']}"]
            rows.append([lr["layer"], fisher, *kept, f"{1 - lr['flops_after'] / max(lr['flops_before'], 1):.0%}",
                         err("attention"), err("ffn")])
        notes = []
        if d.get("depth"):
            dp = d["depth"]
            estimates = ", ".join(f"{c['layers_removed']}: {c['estimated_loss']:.3g}" for c in dp["candidates"])
            notes.append(f"Depth search: {dp['chosen']} whole layers removed had the smallest estimated loss increase "
                         f"(diagonal Fisher, by layers removed: {estimates}).")
        for rd in d.get("layer_removal") or []:
            losses = ", ".join(f"{i}: {v:.4g}" for i, v in rd["losses"].items())
            notes.append(f"Layer {rd['removed']} removed: the least loss measured with one layer bypassed "
                         f"(by layer: {losses}).")
        if d.get("recover"):
            r = d["recover"]
            reverted = " (worse: reverted to the re-fitted weights)" if r["reverted"] else ""
            notes.append(f"Distillation: {r['steps']} steps, loss to the original {r['loss_before']:.4g} -> "
                         f"{r['loss_after']:.4g}{reverted}.")
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in (d.get("stage_seconds") or {}).items())
        notes.append(f"Took {d['seconds']:.1f} s ({stages}).")
        layers = Section("Per layer (kept)", ["layer", "layer Fisher", "heads", "FFN neurons", "FLOPs removed",
                                              "attn re-fit error", "FFN re-fit error"], rows, notes=notes, level=3)
        return [summary, layers]


# ---- calibration data ------------------------------------------------------------------------------------


def _examples(ckpt: Checkpoint, data, cfg: PruneConfig, text_column, label_column) -> tuple[list, list | None]:
    if data is None:
        raise EdgekitError("pruning needs calibration data to rank heads and neurons",
                           "pass --calibration-data FILE (a few hundred in-domain texts; labels optional)")
    if isinstance(data, (str, os.PathLike)):
        from edgekit.data import load_examples

        ex = load_examples(data, ckpt.task, text_column, label_column, id2label=ckpt.id2label,
                           limit=cfg.calibration_samples, use_labels=cfg.use_labels, flag="--calibration-data")
        texts, labels = ex.texts, ex.labels
    elif hasattr(data, "texts"):  # an edgekit.data.Examples, or anything shaped like it
        texts, labels = list(data.texts), getattr(data, "labels", None)
    else:
        texts, labels = list(data), None
    texts = texts[: cfg.calibration_samples]
    labels = labels[: cfg.calibration_samples] if labels is not None and cfg.use_labels else None
    if not texts:
        raise EdgekitError("the calibration data holds no examples", "give a file with at least one text")
    return texts, labels


def _batches(tokenizer, texts: list, labels: list | None, words: bool, cfg: PruneConfig, accepted,
             model_config: dict | None = None) -> list[dict]:
    import torch

    from edgekit.data import encode, first_subtokens, max_tokens

    # never more tokens than the model has positions (config.json) or the tokenizer allows
    max_length = max_tokens(model_config or {}, tokenizer, cfg.max_length)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
    batches = []
    for start in range(0, len(order), cfg.batch_size):
        idx = order[start: start + cfg.batch_size]
        arrays, word_ids = encode(tokenizer, [texts[i] for i in idx], max_length, words)
        # e.g. DistilBERT takes no token_type_ids
        batch = {k: torch.from_numpy(v) for k, v in arrays.items() if k in accepted}
        if labels is not None and words:  # word tags -> the first sub-token of each word; the rest ignored
            tags = torch.full(arrays["input_ids"].shape, -100)
            for row, i in enumerate(idx):
                wids = word_ids[row]
                for pos in first_subtokens(wids):
                    tags[row, pos] = labels[i][wids[pos]]
            batch["labels"] = tags
        elif labels is not None:
            batch["labels"] = torch.tensor([labels[i] for i in idx])
        batches.append(batch)
    return batches


# ---- the stage -------------------------------------------------------------------------------------------


def _select(cfg: PruneConfig, grads_h, grads_n, grads_l, dims, seq_len: int, removed: list[int] | None = None):
    """(the Choice of layers, heads and neurons kept; the depth search's record or None). ``removed``: the
    layers ``--layers`` takes out, measured (:func:`importance.measured_layer_removal`)."""
    from edgekit.compress import importance as imp
    from edgekit.compress.prune_arch import head_macs, layer_macs, neuron_macs

    head_scores, neuron_scores, layer_scores = (g.pow(2).sum(0) for g in (grads_h, grads_n, grads_l))  # diag. Fisher
    if cfg.sparsity is not None:
        # the budget counts every original layer: removed layers spend it first, the search spends the rest
        budget = int((1 - cfg.sparsity) * dims.layers * layer_macs(dims.heads, dims.ffn, dims, seq_len))

        def search(h, n):
            return imp.search_by_flops(h, n, head_macs(dims, seq_len), neuron_macs(dims, seq_len), budget)
    else:
        def search(h, n):
            return imp.search_by_ratio(h, n, cfg.heads or 0.0, cfg.ffn or 0.0, model_layers=dims.layers)

    depth = None
    if cfg.depth:
        candidates = imp.search_depth(head_scores, neuron_scores, layer_scores, search)
        choice = min(candidates, key=lambda c: c.estimated_loss)
        depth = {"chosen": dims.layers - len(choice.layers), "candidates": [
            {"layers_removed": dims.layers - len(c.layers),
             "removed": [i for i in range(dims.layers) if i not in c.layers], "estimated_loss": c.estimated_loss,
             "flops_after": 2 * sum(layer_macs(int(h.sum()), int(n.sum()), dims, seq_len)
                                    for h, n in zip(c.heads, c.neurons))} for c in candidates]}
    else:
        choice = imp.search_with_layers(head_scores, neuron_scores, layer_scores, cfg.layers or 0, search, removed)
    if cfg.rearrange:
        kept = choice.layers
        choice.heads[kept], choice.neurons[kept] = imp.rearrange_all(grads_h[:, kept], grads_n[:, kept],
                                                                     choice.heads[kept], choice.neurons[kept])
    return choice, depth


def prune(checkpoint, output, config: PruneConfig, calibration_data=None, text_column: str | None = None,
          label_column: str | None = None, overwrite: bool = False, progress=None) -> PruneReport:
    """Prune ``checkpoint`` into a new checkpoint folder ``output``; the input is only read.

    ``calibration_data``: a data file (TSV/CSV/JSONL/Parquet), an ``Examples``, or a list of texts. With labels
    (and ``config.use_labels``) heads and neurons are ranked by the Fisher of the task loss, otherwise by the
    Fisher of the output-reconstruction loss. ``progress(description, completed, total)`` is called as work
    advances.
    """
    import torch
    import transformers

    from edgekit.compress.importance import LABELED, RECONSTRUCTION, mask_gradients, measured_layer_removal
    from edgekit.compress.prune_arch import (Dims, count_params, encoder_layers, get_arch, layer_macs, remove_layers,
                                             slice_model)
    from edgekit.compress.recover import distill, refit_layers

    t0 = time.perf_counter()
    ckpt = open_checkpoint(checkpoint, trust_remote_code=config.trust_remote_code)
    # Pruning works on the checkpoint's own head (its detected task), whatever task the run overrides to.
    ckpt = open_checkpoint(ckpt, detect_task(ckpt.config).name)
    if is_decoder(ckpt.task):
        raise EdgekitError(f"structured pruning of decoder language models ({ckpt.model_type}) is not in edgekit yet",
                           "compress it without --prune: quantize with --bits 4 or 8")
    if (ckpt.path / PRUNING_FILE).is_file():
        raise EdgekitError(f"{ckpt.path} is already pruned by edgekit",
                           "prune the original checkpoint instead, with the total sparsity you want")
    arch = get_arch(ckpt.model_type)
    if calibration_data is None:
        calibration_data = config.calibration_data
    texts, labels = _examples(ckpt, calibration_data, config, text_column, label_column)
    stages: dict[str, float] = {}
    torch.manual_seed(config.seed)
    original = load_model(ckpt)
    dims = Dims.of(original.config, arch)
    if config.layers is not None and config.layers > dims.layers - 1:
        raise EdgekitError(f"--layers must be from 1 to {dims.layers - 1} for this {dims.layers}-layer model, "
                           f"not {config.layers}", "at least one encoder layer has to stay")
    with staged_output(output, overwrite, protect=(ckpt.path,)) as staging:
        words = ckpt.task.name == "token-classification"
        accepted = set(inspect.signature(original.forward).parameters)
        batches = _batches(ckpt.tokenizer, texts, labels, words, config, accepted, ckpt.config)
        # a single-output head (regression) has no softmax: it is ranked like features, by reconstruction
        softmax = ckpt.task.output == "logits" and original.config.num_labels > 1
        labeled = labels is not None and softmax

        t = time.perf_counter()
        grads_h, grads_n, grads_l = mask_gradients(original, arch, batches, labeled, softmax, ckpt.task.output,
                                                   config.seed, progress)
        removed, layer_rounds = None, None
        if config.layers:
            removed, layer_rounds = measured_layer_removal(original, arch, batches, config.layers, labeled, softmax,
                                                           ckpt.task.output, progress)
        choice, depth = _select(config, grads_h, grads_n, grads_l, dims, config.seq_len, removed)
        stages["importance"] = time.perf_counter() - t

        kept = choice.layers
        heads_kept = [r.nonzero().flatten().tolist() for r in choice.heads]
        neurons_kept = [r.nonzero().flatten().tolist() for r in choice.neurons]
        pruned = copy.deepcopy(original)
        # layers first: the head pruning that follows then records its indices at the layers' new positions
        remove_layers(pruned, arch, kept)
        slice_model(pruned, arch, [heads_kept[i] for i in kept], [neurons_kept[i] for i in kept])
        t = time.perf_counter()
        refit = refit_layers(original, pruned, arch, batches, progress, kept) if config.refit else None
        stages["refit"] = time.perf_counter() - t
        recover = None
        if config.recover_steps:
            t = time.perf_counter()
            recover = distill(original, pruned, batches, config.recover_steps, config.recover_lr, softmax,
                              ckpt.task.output, progress)
            stages["distill"] = time.perf_counter() - t

        t = time.perf_counter()
        pruned.save_pretrained(staging, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).is_file():
                shutil.copy2(ckpt.path / name, staging / name)
        refit_of = dict(zip(kept, refit or []))
        layer_scores = grads_l.pow(2).sum(0)
        layers = []
        for i in range(dims.layers):  # a removed layer keeps no head and no neuron: 0 FLOPs after
            nh, nn_ = len(heads_kept[i]), len(neurons_kept[i])
            layers.append(LayerReport(i, nh, dims.heads, nn_, dims.ffn,
                                      2 * layer_macs(dims.heads, dims.ffn, dims, config.seq_len),
                                      2 * layer_macs(nh, nn_, dims, config.seq_len), refit_of.get(i),
                                      removed=i not in kept, fisher=float(layer_scores[i])))
        criterion = LABELED if labeled else RECONSTRUCTION
        flops_before, flops_after = sum(lr.flops_before for lr in layers), sum(lr.flops_after for lr in layers)
        spec = {
            "schema_version": PRUNING_SCHEMA_VERSION, "format": PRUNING_FORMAT, "model_type": ckpt.model_type,
            "auto_class": type(pruned).__name__, "task": ckpt.task.name,
            "original": dataclasses.asdict(dims),
            "kept_layers": kept,  # the original index of each layer below
            "layers": [{"heads_kept": heads_kept[i], "neurons_kept": layers[i].neurons_kept,
                        "neuron_index": neurons_kept[i]}  # provenance: not needed to reload
                       for i in kept],
            "provenance": {"source": str(ckpt.path), "criterion": criterion, "seq_len": config.seq_len,
                           "flops_before": flops_before, "flops_after": flops_after,
                           "config": config.to_dict(), "edgekit": __version__},
        }
        (staging / PRUNING_FILE).write_text(_dump_spec(spec), encoding="utf-8")
        stages["save"] = time.perf_counter() - t
        if progress:
            progress("Saving", 1, 1)

    enc_before = sum(count_params(layer) for layer in encoder_layers(original, arch))
    enc_after = sum(count_params(layer) for layer in encoder_layers(pruned, arch))
    params_before, params_after = count_params(original), count_params(pruned)
    return PruneReport(
        source=str(ckpt.path), output=str(Path(output).resolve()), model_type=ckpt.model_type, task=ckpt.task.name,
        criterion=criterion, calibration_samples=len(texts), seq_len=config.seq_len,
        params_before=params_before, params_after=params_after,
        encoder_params_before=enc_before, encoder_params_after=enc_after,
        flops_before=flops_before, flops_after=flops_after, flops_reduction=1 - flops_after / flops_before,
        params_reduction=1 - params_after / params_before, layers=layers, recover=recover,
        seconds=time.perf_counter() - t0, stage_seconds=stages, config=config.to_dict(),
        environment={"torch": torch.__version__, "transformers": transformers.__version__,
                     "threads": torch.get_num_threads(), "edgekit": __version__},
        removed_layers=[lr.layer for lr in layers if lr.removed], depth=depth, layer_removal=layer_rounds,
    )


def _dump_spec(spec: dict) -> str:
    """Indented JSON with one line per layer (index lists inline), so the file stays readable."""
    layers = ",\n".join("    " + json.dumps(layer) for layer in spec["layers"])
    text = json.dumps({**spec, "layers": "@LAYERS@", "kept_layers": "@KEPT@"}, indent=2)
    text = text.replace('"@KEPT@"', json.dumps(spec["kept_layers"]))
    return text.replace('"@LAYERS@"', "[\n" + layers + "\n  ]") + "\n"
