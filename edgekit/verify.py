"""The accuracy gate: the ORIGINAL checkpoint and a candidate, on the same examples, through the same
runtime interface that bench uses. Exit 0 pass, 1 gate failed, 2 usage/input error."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.metrics import meets
from edgekit.options import StageConfig, base_option, option, task_option, threads_option, trust_remote_code_option
from edgekit.progress import Progress
from edgekit.reports import Cell, FAIL, PASS, RenderedReport, SCHEMA_VERSION, Section, fmt_num

# When the data has no labels, the gate still means something: agreement with the original.
DEFAULT_MIN_AGREEMENT_UNLABELED = 98.0
DEFAULT_MIN_COSINE = 0.99  # feature-extraction: mean cosine of pooled embeddings vs the original
# Regression heads, in units of the spread (std) of the original's outputs on the data: an INT8 model stays
# within a few percent of it; an unrelated model is of the order of the spread itself (relative RMSE near 1).
DEFAULT_MAX_RELATIVE_RMSE = 0.1
DEFAULT_MAX_ABS_DIFF_STD = 0.5
DEFAULT_MAX_MEAN_ABS_DIFF_STD = 0.1


class GateConfig(StageConfig):
    # Every threshold has a closed range (options.option(between=...)): one that can never pass (a negative
    # drop, agreement above 100%) or means nothing (nan, inf) is refused, on the command line and in a recipe.
    max_drop: float = option(1.0, "Largest allowed drop of the labeled metric, in absolute points.",
                             between=(0, 100), unit=" points")
    max_relative_drop: Optional[float] = option(
        None, "Largest allowed drop as a fraction of the original (0.01 = 1%).", between=(0, 1))
    min_agreement: Optional[float] = option(
        None, "Smallest allowed top-1 agreement with the original, in % (retrieval agreement for feature-extraction).",
        between=(0, 100), unit="%")
    min_cosine: Optional[float] = option(None, "feature-extraction: smallest allowed mean cosine (default 0.99).",
                                         between=(0, 1))
    # Regression heads (num_labels=1): top-1 agreement of one output is always 100%, so they are gated on the
    # size of the difference from the original's outputs instead.
    max_relative_rmse: float = option(
        DEFAULT_MAX_RELATIVE_RMSE, "Regression heads: largest allowed RMSE of (candidate - original) divided by "
        "the standard deviation of the original's outputs.", between=(0, 1))
    max_abs_diff: Optional[float] = option(
        None, "Regression heads: largest allowed |candidate - original| on any example, in output units "
        f"(default {DEFAULT_MAX_ABS_DIFF_STD} x the std of the original's outputs).", between=(0, None))
    max_mean_abs_diff: Optional[float] = option(
        None, "Regression heads: largest allowed mean |candidate - original|, in output units "
        f"(default {DEFAULT_MAX_MEAN_ABS_DIFF_STD} x the std of the original's outputs).", between=(0, None))
    # Decoders (text-generation): perplexity on held-out text, relative to the original's.
    max_ppl_increase: float = option(
        0.05, "text-generation: largest allowed perplexity increase over the original's (5% or 0.05).",
        fraction=True, between=(0, 100))
    min_generation_match: Optional[float] = option(
        None, "text-generation: smallest allowed share of greedy new tokens identical to the original's before "
        "the first difference, in %.", between=(0, 100), unit="%")


class VerifyConfig(StageConfig):
    """The evaluation data and how it is read (a recipe's ``data`` section), and where the candidate runs."""

    data: str = option("", "Evaluation data: TSV, CSV, JSONL or Parquet.", recipe_key="eval", path=True)
    text_column: Optional[str] = option(None, "Column holding the text (tokens for token-classification).")
    label_column: Optional[str] = option(None, "Column holding the labels (names or ids); optional.")
    task: Optional[str] = task_option()
    limit: Optional[int] = option(None, "Use only the first N examples.", ge=1)
    batch_size: int = option(32, "Batch size of the evaluation.", ge=1)
    max_length: int = option(128, "Truncation of the evaluation text, in tokens (text-generation: the perplexity "
                             "window).", ge=1)
    stride: Optional[int] = option(None, "text-generation: tokens the perplexity window advances by (default: "
                                   "half of --max-length).", ge=1)
    prompts: Optional[str] = option(None, "text-generation: prompts for the greedy-generation check, one per line "
                                    "(default: the first tokens of the first documents of --data).", path=True)
    new_tokens: int = option(32, "text-generation: tokens generated greedily per prompt for that check.", ge=1)
    tsv_quoting: bool = option(False, "Honour quotes in TSV (off by default, as GLUE).")
    threads: Optional[int] = threads_option()
    trust_remote_code: bool = trust_remote_code_option()  # for the original and a checkpoint candidate
    base: Optional[str] = base_option()  # the original as a LoRA adapter folder
    # The candidate's runtime (None: from the artifact); the original stays on torch.
    runtime: Optional[Literal["onnxruntime", "tensorrt", "torch"]] = option(
        None, "Runtime of the CANDIDATE (default: from the artifact; a TensorRT engine folder runs on tensorrt).",
        recipe=False)
    # The candidate's device: the gate runs on the runtime that ships.
    device: str = option("cpu", "Where the CANDIDATE runs: cpu, cuda or tensorrt (onnxruntime's provider); "
                         "the gate is the same.", recipe=False)


@dataclass
class Check:
    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool


@dataclass
class VerifyReport(RenderedReport):
    task: str
    original: str
    candidate: str
    runtimes: dict
    data: dict
    n_examples: int
    original_metrics: dict
    candidate_metrics: dict
    agreement: dict
    checks: list
    passed: bool
    seconds: float
    config: dict = field(default_factory=dict)  # "gate": the thresholds applied (effective_gate), not the ones asked
    notes: list = field(default_factory=list)  # options and columns given but not used by this task's gate, one sentence each
    schema_version: int = SCHEMA_VERSION

    def __bool__(self) -> bool:
        return self.passed

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        om, cm = d.get("original_metrics") or {}, d.get("candidate_metrics") or {}
        tables = []
        if om:
            tables.append((["metric", "original", "candidate", "delta"],
                           [[k, f"{v:.2f}", "-" if cm.get(k) is None else f"{cm[k]:.2f}",
                             "-" if cm.get(k) is None else f"{cm[k] - v:+.2f}"] for k, v in om.items()]))
        tables.append((["agreement with original", "value"], [[k, fmt_num(v)] for k, v in (d.get("agreement") or {}).items()]))
        verdict = PASS if d["passed"] else FAIL
        title = f"Verify: {'PASSED' if d['passed'] else 'FAILED'} ({d['task']}, {d['n_examples']} examples)"
        out = [Section(title if i == 0 else None, h, rows, status=verdict if i == 0 else None)
               for i, (h, rows) in enumerate(tables)]
        checks = [[c["name"], fmt_num(c["value"]), f"{c['comparison']} {c['threshold']}",
                   Cell("pass", PASS) if c["passed"] else Cell("FAIL", FAIL)] for c in d.get("checks") or []]
        runtimes = d.get("runtimes") or {}
        notes = [f"Original on {runtimes['original']}, candidate on {runtimes['candidate']}."] if runtimes else []
        notes += [f"Note: {n}" for n in d.get("notes") or []]
        out.append(Section("Gate", ["check", "value", "threshold", "result"], checks, notes=notes, align="lrrl",
                           level=3))
        return out

    def write_junit(self, path) -> None:
        from edgekit.reports import JunitCase, write_junit

        # Every check is judged on the same evaluation: its time is that evaluation's share, so the cases add up
        # to the run's time.
        share = (self.seconds or 0.0) / max(len(self.checks), 1)
        context = (f"{self.n_examples} examples of {(self.data or {}).get('path')}; original {self.original}, "
                   f"candidate {self.candidate}")
        cases = []
        for c in self.checks:
            figures = f"{c['name']} = {c['value']:.6g} (must be {c['comparison']} {c['threshold']})"
            failure = None if c["passed"] else f"{c['name']} = {c['value']:.6g}, must be {c['comparison']} {c['threshold']}"
            cases.append(JunitCase(c["name"], f"edgekit.verify.{self.task}", share, failure=failure,
                                   failure_detail=context, output=f"{figures}; {context}"))
        write_junit(path, "edgekit verify", cases, {"original": self.original, "candidate": self.candidate},
                    seconds=self.seconds)


def _candidate_device(config: VerifyConfig, max_length: int) -> str:
    """For onnxruntime's TensorRT provider, a profile covering this evaluation's batches (up to --batch-size
    examples, up to ``max_length`` tokens), so that no batch falls outside it and rebuilds the engine."""
    if config.device != "tensorrt":
        return config.device
    from edgekit.runtimes.ort_gpu import TensorrtDevice

    return TensorrtDevice((1, config.batch_size, config.batch_size), (1, max_length, max_length))


# The original's outputs on an evaluation set, kept for the life of the process: a search worker verifies dozens
# of candidates against one original on one data file, and evaluating the original in torch was half of each
# verify. Keyed by everything the outputs depend on (the checkpoint's files by size and mtime, the data file's,
# how it is read and batched, the threads); two entries at most.
_ORIGINAL_OUTPUTS: dict = {}


def _original_key(ckpt, config: VerifyConfig, max_length: int) -> tuple:
    files = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(ckpt.path).iterdir())
                  if f.is_file())
    data = Path(config.data).stat()
    return (str(ckpt.path), files, str(Path(config.data).resolve()), data.st_size, data.st_mtime_ns, ckpt.task.name,
            config.text_column, config.label_column, config.limit, config.tsv_quoting, max_length, config.batch_size,
            config.threads)


def _remember(key: tuple, value) -> None:
    while len(_ORIGINAL_OUTPUTS) >= 2:
        _ORIGINAL_OUTPUTS.pop(next(iter(_ORIGINAL_OUTPUTS)))
    _ORIGINAL_OUTPUTS[key] = value


def _collect(session, tokenizer, examples, cfg: VerifyConfig, max_length: int, step) -> list:
    """Outputs per example (a row of logits, a [tokens, labels] array, or a pooled embedding)."""
    from edgekit.data import batches, first_subtokens
    from edgekit.metrics import mean_pool

    out = []
    for arrays, word_ids, _ in batches(tokenizer, examples, cfg.batch_size, max_length):
        y = np.asarray(session.run(arrays), dtype=np.float32)
        if session.task == "feature-extraction":
            out.extend(mean_pool(y, arrays["attention_mask"]))
        elif session.task == "token-classification":
            for i, wids in enumerate(word_ids):
                out.append(y[i, first_subtokens(wids)])  # one prediction per word
        else:
            out.extend(y)
        step.advance(len(arrays["input_ids"]))
    return out


def _task_metrics(task, outputs, labels, id2label) -> dict:
    from edgekit.metrics import classification_metrics, entity_f1

    if labels is None or task == "feature-extraction":
        return {}
    if task == "text-classification":
        return classification_metrics(np.stack(outputs), labels)
    pred = [[id2label[int(i)] for i in o.argmax(-1)] for o in outputs]
    true = [[id2label[i] for i in row[: len(o)]] for o, row in zip(outputs, labels)]
    return entity_f1(pred, true)


def _agreement(task, orig, cand) -> dict:
    from edgekit.metrics import cosine_rows, retrieval_agreement

    if task == "feature-extraction":
        o, c = np.stack(orig), np.stack(cand)
        cos = cosine_rows(o, c)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                "retrieval_agreement": retrieval_agreement(o, c), "max_abs_diff": float(np.abs(o - c).max())}
    o, c = np.concatenate([x.reshape(-1, x.shape[-1]) for x in orig]), np.concatenate([x.reshape(-1, x.shape[-1]) for x in cand])
    d = np.abs(o - c)
    return {"top1_agreement": 100.0 * float((o.argmax(-1) == c.argmax(-1)).mean()),
            "max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean())}


def _regression_agreement(orig, cand) -> dict:
    """A regression head's outputs against the original's: the size of the difference, absolute and relative
    to the spread of the original's outputs (RMSE / std: 0 is identical, about 1.4 is an unrelated model)."""
    from edgekit.metrics import regression_agreement

    return regression_agreement(np.concatenate([x.ravel() for x in orig]), np.concatenate([x.ravel() for x in cand]))


def _regression_gate(gate: GateConfig, agreement: dict) -> dict:
    """The regression thresholds applied; the absolute ones default to a share of the original's std."""
    std = agreement["original_std"]
    return {"max_drop": None, "max_relative_drop": None, "min_agreement": None, "min_cosine": None,
            "max_abs_diff": gate.max_abs_diff if gate.max_abs_diff is not None else DEFAULT_MAX_ABS_DIFF_STD * std,
            "max_mean_abs_diff": (gate.max_mean_abs_diff if gate.max_mean_abs_diff is not None
                                  else DEFAULT_MAX_MEAN_ABS_DIFF_STD * std),
            "max_relative_rmse": gate.max_relative_rmse}


def _regression_checks(agreement: dict, applied: dict) -> list[Check]:
    return [Check(name, agreement[name], applied[key], "<=", meets(agreement[name], "<=", applied[key]))
            for name, key in (("max_abs_diff", "max_abs_diff"), ("mean_abs_diff", "max_mean_abs_diff"),
                              ("relative_rmse", "max_relative_rmse"))]


def _regression_notes(gate: GateConfig, applied: dict, unused_label_column: str | None) -> list[str]:
    notes = [f"a regression head (one output) makes top-1 agreement meaningless, so --max-drop, --max-relative-drop "
             f"and --min-agreement are not used; the gate is max |difference| <= {applied['max_abs_diff']:.4g}, "
             f"mean |difference| <= {applied['max_mean_abs_diff']:.4g} and relative RMSE <= "
             f"{applied['max_relative_rmse']} against the original's outputs."]
    if unused_label_column:
        notes.append(f"the label column '{unused_label_column}' is not used: a regression head is compared with "
                     f"the original's outputs, not with labels.")
    if gate.min_cosine is not None:
        notes.append("--min-cosine applies to feature-extraction only and is not used for a regression head.")
    return notes


def _check_same_outputs(orig: list, cand: list, task: str) -> None:
    """A candidate with another number of labels (or another hidden size) cannot be compared row by row."""
    n_orig, n_cand = orig[0].shape[-1], cand[0].shape[-1]
    if n_orig != n_cand:
        what = "an embedding size" if task == "feature-extraction" else "a number of labels"
        raise EdgekitError(f"the candidate has {what} of {n_cand} but the original has {n_orig}",
                           "compare a candidate made from this checkpoint")


def effective_gate(task: str, labeled: bool, gate: GateConfig) -> dict:
    """The thresholds the gate applies to this task and data, as recorded in the report: defaults filled in,
    and None for a threshold that does not apply (no labeled metric to drop; cosine outside feature-extraction)."""
    feature = task == "feature-extraction"
    min_agree = gate.min_agreement
    if min_agree is None and not labeled and not feature:
        min_agree = DEFAULT_MIN_AGREEMENT_UNLABELED
    return {"max_drop": gate.max_drop if labeled else None,
            "max_relative_drop": gate.max_relative_drop if labeled else None,
            "min_agreement": min_agree,
            "min_cosine": (gate.min_cosine if gate.min_cosine is not None else DEFAULT_MIN_COSINE) if feature else None}


def _checks(task, labeled_metric, om, cm, agreement, applied: dict) -> list[Check]:
    checks = []
    if applied["max_drop"] is not None:
        drop = om[labeled_metric] - cm[labeled_metric]
        checks.append(Check(f"{labeled_metric}_drop_points", drop, applied["max_drop"], "<=",
                            meets(drop, "<=", applied["max_drop"])))
        if applied["max_relative_drop"] is not None:
            rel = drop / om[labeled_metric] if om[labeled_metric] else 0.0
            limit = applied["max_relative_drop"]
            checks.append(Check(f"{labeled_metric}_relative_drop", rel, limit, "<=", meets(rel, "<=", limit)))
    agree_key = "retrieval_agreement" if task == "feature-extraction" else "top1_agreement"
    if applied["min_agreement"] is not None:
        limit = applied["min_agreement"]
        checks.append(Check(agree_key, agreement[agree_key], limit, ">=", meets(agreement[agree_key], ">=", limit)))
    if applied["min_cosine"] is not None:
        limit = applied["min_cosine"]
        checks.append(Check("mean_cosine", agreement["mean_cosine"], limit, ">=", meets(agreement["mean_cosine"], ">=", limit)))
    return checks


def _notes(task: str, labeled: bool, gate: GateConfig, applied: dict, unused_label_column: str | None) -> list[str]:
    """One sentence for each option or column the gate does not use here: nothing is ignored silently."""
    notes = []
    if task == "feature-extraction":
        also = (f" and retrieval agreement >= {applied['min_agreement']}% (--min-agreement)"
                if applied["min_agreement"] is not None else "")
        notes.append(f"feature-extraction has no labeled metric: --max-drop and --max-relative-drop are not used; "
                     f"the gate is mean cosine >= {applied['min_cosine']}{also}.")
        if unused_label_column:
            notes.append(f"the label column '{unused_label_column}' is not used: feature-extraction compares "
                         f"embeddings with the original's, not with labels.")
    elif not labeled:
        notes.append(f"the data has no label column: --max-drop and --max-relative-drop are not used; the gate is "
                     f"top-1 agreement >= {applied['min_agreement']}% with the original.")
    if gate.min_cosine is not None and task != "feature-extraction":
        notes.append(f"--min-cosine applies to feature-extraction only and is not used for {task}.")
    return notes


def _opened(candidate, task: str, trust_remote_code: bool):
    """A checkpoint candidate opened with the user's --trust-remote-code (others are loaded as they are)."""
    from edgekit.checkpoint import Checkpoint, open_checkpoint
    from edgekit.runtimes.base import artifact_kind

    if isinstance(candidate, Checkpoint) or not Path(candidate).is_dir() or artifact_kind(Path(candidate)) != "checkpoint":
        return candidate
    return open_checkpoint(candidate, task, trust_remote_code)


def verify(original, candidate, config: VerifyConfig, gate: GateConfig | None = None,
           progress: Progress | None = None) -> VerifyReport:
    """Compare ``candidate`` (ONNX folder or checkpoint) with the ``original`` checkpoint on ``config.data``."""
    from edgekit.checkpoint import open_checkpoint
    import dataclasses

    from edgekit.data import count_truncated, load_examples, max_tokens
    from edgekit.runtimes.base import load
    from edgekit.tasks import is_decoder, is_regression

    gate = gate or GateConfig()
    progress = progress or Progress()
    if not config.data:
        raise EdgekitError("verify needs evaluation data", "pass --data FILE (TSV, CSV, JSONL or Parquet)")
    t0 = time.perf_counter()
    # a Checkpoint value (compress passes its own) is not reopened
    ckpt = open_checkpoint(original, config.task, config.trust_remote_code, config.base)
    task = ckpt.task
    if is_decoder(task):
        return _verify_decoder(ckpt, candidate, config, gate, progress, t0)
    regression = task.name == "text-classification" and is_regression(ckpt.config)
    # A regression head's labels are scores, not classes: they are named as unused instead of mapped to ids.
    read_as = dataclasses.replace(task, labeled_metric=None) if regression else task
    examples = load_examples(config.data, read_as, config.text_column, config.label_column, ckpt.id2label,
                             config.limit, config.tsv_quoting)
    tokenizer = ckpt.tokenizer
    max_length = max_tokens(ckpt.config, tokenizer, config.max_length)
    truncated = count_truncated(tokenizer, examples.texts, max_length)
    memo = _original_key(ckpt, config, max_length)
    with progress.step("Loading models"):
        ref = None if memo in _ORIGINAL_OUTPUTS else load(ckpt, threads=config.threads, task=task.name)
        cand = load(_opened(candidate, task.name, config.trust_remote_code), threads=config.threads, task=task.name,
                    device=_candidate_device(config, max_length),
                    runtime=config.runtime)
    if cand.task != task.name:
        raise EdgekitError(f"the candidate is a {cand.task} model but the original is {task.name}", "compare models of one task")
    outs = {}
    if ref is None:
        ref_name, outs["original"] = _ORIGINAL_OUTPUTS[memo]
    else:
        with progress.step(f"Evaluating original ({ref.name})", total=len(examples)) as step:
            outs["original"] = _collect(ref, tokenizer, examples, config, max_length, step)
        ref_name = ref.name
        _remember(memo, (ref_name, outs["original"]))
    with progress.step(f"Evaluating candidate ({cand.name})", total=len(examples)) as step:
        outs["candidate"] = _collect(cand, tokenizer, examples, config, max_length, step)
    _check_same_outputs(outs["original"], outs["candidate"], task.name)
    if regression:
        om = cm = {}
        agreement = _regression_agreement(outs["original"], outs["candidate"])
        applied = _regression_gate(gate, agreement)
        checks = _regression_checks(agreement, applied)
        notes = _regression_notes(gate, applied, examples.unused_label_column)
    else:
        om = _task_metrics(task.name, outs["original"], examples.labels, ckpt.id2label)
        cm = _task_metrics(task.name, outs["candidate"], examples.labels, ckpt.id2label)
        agreement = _agreement(task.name, outs["original"], outs["candidate"])
        labeled = bool(task.labeled_metric) and task.labeled_metric in om
        applied = effective_gate(task.name, labeled, gate)
        checks = _checks(task.name, task.labeled_metric, om, cm, agreement, applied)
        notes = _notes(task.name, labeled, gate, applied, examples.unused_label_column)
    if truncated:
        notes.append(f"{truncated} of {len(examples)} examples are longer than {max_length} tokens (the model's "
                     f"maximum length, or edgekit's evaluation limit if lower) and were truncated to it.")
    return VerifyReport(
        task=task.name, original=str(ckpt.origin), candidate=str(Path(candidate).resolve()),
        runtimes={"original": ref_name, "candidate": cand.name},
        data={"path": examples.source, "text_column": examples.text_column, "label_column": examples.label_column,
              "label_mapping": examples.label_mapping, "max_length": max_length, "truncated_examples": truncated,
              "regression_head": regression},
        n_examples=len(examples), original_metrics=om, candidate_metrics=cm, agreement=agreement,
        checks=[c.__dict__ for c in checks], passed=all(c.passed for c in checks),
        seconds=time.perf_counter() - t0, config={**config.to_dict(), "gate": applied},
        notes=notes,
    )


def _verify_decoder(ckpt, candidate, config: VerifyConfig, gate: GateConfig, progress: Progress,
                    t0: float) -> VerifyReport:
    """text-generation: perplexity, next-token agreement and greedy generation against the original."""
    from edgekit import lm_eval
    from edgekit.runtimes.decoder import check_length, load_decoder

    docs, column = lm_eval.read_documents(config.data, config.text_column, config.limit, config.tsv_quoting)
    tokenizer = ckpt.tokenizer
    ids = lm_eval.token_stream(tokenizer, docs)
    with progress.step("Loading models"):
        ref = load_decoder(ckpt, threads=config.threads)
        cand_path = _opened(candidate, ckpt.task.name, config.trust_remote_code)
        cand = load_decoder(cand_path, threads=config.threads, device=config.device)
    if cand.vocab_size != ref.vocab_size:
        raise EdgekitError(f"the candidate has a vocabulary of {cand.vocab_size} but the original {ref.vocab_size}",
                           "compare a candidate made from this checkpoint")
    check_length(ref, config.max_length, "--max-length")
    stride = config.stride or max(1, config.max_length // 2)
    if stride > config.max_length:
        raise EdgekitError(f"--stride {stride} is longer than --max-length {config.max_length}",
                           "use a stride of at most the window length (half of it is usual)")
    n_windows = len(lm_eval.windows(len(ids), config.max_length, stride))
    with progress.step(f"Perplexity over {len(ids)} tokens ({ref.name} and {cand.name})", total=n_windows) as step:
        ppl = lm_eval.compare_perplexity(ref, cand, ids, config.max_length, stride, step)
    prompts = lm_eval.prompts_for(config.prompts, docs, tokenizer)
    for p in prompts:
        check_length(ref, len(p) + config.new_tokens, "a prompt plus --new-tokens")
    with progress.step(f"Greedy generation from {len(prompts)} prompts", total=len(prompts)) as step:
        gen = lm_eval.compare_generation(ref, cand, prompts, config.new_tokens, step)
    po, pc = ppl["perplexity"]["original"], ppl["perplexity"]["candidate"]
    increase = pc / po - 1
    agreement = {"top1_agreement": ppl["top1_agreement"], "perplexity_increase": increase,
                 "generation_match": gen["generation_match"]}
    applied = {"max_ppl_increase": gate.max_ppl_increase, "min_agreement": gate.min_agreement,
               "min_generation_match": gate.min_generation_match}
    checks = [Check("perplexity_increase", increase, gate.max_ppl_increase, "<=",
                    meets(increase, "<=", gate.max_ppl_increase))]
    if gate.min_agreement is not None:
        checks.append(Check("top1_agreement", ppl["top1_agreement"], gate.min_agreement, ">=",
                            meets(ppl["top1_agreement"], ">=", gate.min_agreement)))
    if gate.min_generation_match is not None:
        checks.append(Check("generation_match", gen["generation_match"], gate.min_generation_match, ">=",
                            meets(gen["generation_match"], ">=", gate.min_generation_match)))
    notes = ["text-generation is gated on perplexity (--max-ppl-increase)"
             + (", top-1 agreement" if gate.min_agreement is not None else "")
             + (", generation match" if gate.min_generation_match is not None else "")
             + "; --max-drop, --max-relative-drop and --min-cosine are not used."]
    if config.label_column:
        notes.append(f"the label column '{config.label_column}' is not used: a language model is scored on its text.")
    return VerifyReport(
        task=ckpt.task.name, original=str(ckpt.origin), candidate=str(Path(candidate).resolve()),
        runtimes={"original": ref.name, "candidate": cand.name},
        data={"path": str(Path(config.data).resolve()), "text_column": column, "documents": len(docs),
              "tokens": len(ids), "scored_tokens": ppl["scored_tokens"], "max_length": config.max_length,
              "stride": stride, "prompts": gen["prompts"], "new_tokens": config.new_tokens,
              "first_difference": gen["first_difference"],
              **({"adapter": ckpt.adapter} if ckpt.adapter else {})},
        n_examples=len(docs), original_metrics={"perplexity": po}, candidate_metrics={"perplexity": pc},
        agreement=agreement, checks=[c.__dict__ for c in checks], passed=all(c.passed for c in checks),
        seconds=time.perf_counter() - t0, config={**config.to_dict(), "gate": applied}, notes=notes,
    )
