"""The accuracy gate: the ORIGINAL checkpoint and a candidate, on the same examples, through the same
runtime interface that bench uses. Exit 0 pass, 1 gate failed, 2 usage/input error."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.progress import Progress
from edgekit.reports import SCHEMA_VERSION, Report, md_table

# When the data has no labels, the gate still means something: agreement with the original.
DEFAULT_MIN_AGREEMENT_UNLABELED = 98.0
DEFAULT_MIN_COSINE = 0.99  # feature-extraction: mean cosine of pooled embeddings vs the original


@dataclass
class GateConfig:
    max_drop: float = 1.0  # absolute points of the labeled metric
    max_relative_drop: float | None = None  # fraction of the original's metric, e.g. 0.01
    min_agreement: float | None = None  # % top-1 agreement (retrieval agreement for feature-extraction)
    min_cosine: float | None = None  # feature-extraction


@dataclass
class VerifyConfig:
    data: str = ""
    text_column: str | None = None
    label_column: str | None = None
    task: str | None = None
    limit: int | None = None
    batch_size: int = 32
    max_length: int = 128
    tsv_quoting: bool = False
    threads: int | None = None
    runtime: str | None = None  # the candidate's runtime (None: from the artifact); the original stays on torch
    device: str = "cpu"  # the candidate's device: the gate runs on the runtime that ships


@dataclass
class Check:
    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    passed: bool


@dataclass
class VerifyReport(Report):
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
    config: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __bool__(self) -> bool:
        return self.passed

    def to_markdown(self) -> str:
        lines = [f"## Verify: {'PASSED' if self.passed else 'FAILED'} ({self.task}, {self.n_examples} examples)"]
        if self.original_metrics:
            rows = [[k, self.original_metrics[k], self.candidate_metrics[k],
                     self.candidate_metrics[k] - self.original_metrics[k]] for k in self.original_metrics]
            lines.append(md_table(["metric", "original", "candidate", "delta"], rows))
        lines.append(md_table(["agreement with original", "value"], [[k, v] for k, v in self.agreement.items()]))
        lines.append(md_table(["check", "value", "threshold", "result"],
                              [[c["name"], c["value"], f"{c['comparison']} {c['threshold']}", "pass" if c["passed"] else "**FAIL**"]
                               for c in self.checks]))
        return "\n\n".join(lines)

    def write_junit(self, path) -> None:
        from junit_xml import TestCase, TestSuite, to_xml_report_string

        cases = []
        for c in self.checks:
            tc = TestCase(c["name"], classname=f"edgekit.verify.{self.task}", elapsed_sec=self.seconds / max(len(self.checks), 1),
                          stdout=f"{c['name']} = {c['value']:.6g} (must be {c['comparison']} {c['threshold']})")
            if not c["passed"]:
                tc.add_failure_info(message=f"{c['name']} = {c['value']:.6g}, must be {c['comparison']} {c['threshold']}")
            cases.append(tc)
        suite = TestSuite("edgekit verify", cases, properties={"original": self.original, "candidate": self.candidate})
        Path(path).write_text(to_xml_report_string([suite]), encoding="utf-8")


def _collect(session, tokenizer, examples, cfg: VerifyConfig, step) -> list:
    """Outputs per example (a row of logits, a [tokens, labels] array, or a pooled embedding)."""
    from edgekit.data import batches, first_subtokens
    from edgekit.metrics import mean_pool

    out = []
    for arrays, word_ids, _ in batches(tokenizer, examples, cfg.batch_size, cfg.max_length):
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


def _checks(task, labeled_metric, om, cm, agreement, gate: GateConfig) -> list[Check]:
    checks = []
    if labeled_metric and labeled_metric in om:
        drop = om[labeled_metric] - cm[labeled_metric]
        checks.append(Check(f"{labeled_metric}_drop_points", drop, gate.max_drop, "<=", drop <= gate.max_drop))
        if gate.max_relative_drop is not None:
            rel = drop / om[labeled_metric] if om[labeled_metric] else 0.0
            checks.append(Check(f"{labeled_metric}_relative_drop", rel, gate.max_relative_drop, "<=", rel <= gate.max_relative_drop))
    agree_key = "retrieval_agreement" if task == "feature-extraction" else "top1_agreement"
    min_agree = gate.min_agreement
    if min_agree is None and not checks and task != "feature-extraction":
        min_agree = DEFAULT_MIN_AGREEMENT_UNLABELED
    if min_agree is not None:
        checks.append(Check(agree_key, agreement[agree_key], min_agree, ">=", agreement[agree_key] >= min_agree))
    if task == "feature-extraction":
        min_cos = gate.min_cosine if gate.min_cosine is not None else DEFAULT_MIN_COSINE
        checks.append(Check("mean_cosine", agreement["mean_cosine"], min_cos, ">=", agreement["mean_cosine"] >= min_cos))
    return checks


def verify(original, candidate, config: VerifyConfig, gate: GateConfig | None = None,
           progress: Progress | None = None) -> VerifyReport:
    """Compare ``candidate`` (ONNX folder or checkpoint) with the ``original`` checkpoint on ``config.data``."""
    from edgekit.checkpoint import load_tokenizer, open_checkpoint
    from edgekit.data import load_examples
    from edgekit.runtimes.base import load

    gate = gate or GateConfig()
    progress = progress or Progress()
    if not config.data:
        raise EdgekitError("verify needs evaluation data", "pass --data FILE (TSV, CSV, JSONL or Parquet)")
    t0 = time.perf_counter()
    ckpt = open_checkpoint(original, config.task)
    task = ckpt.task
    examples = load_examples(config.data, task, config.text_column, config.label_column, ckpt.id2label,
                             config.limit, config.tsv_quoting)
    tokenizer = load_tokenizer(ckpt.path)
    with progress.step("Loading models"):
        ref = load(ckpt.path, threads=config.threads, task=task.name)
        cand = load(candidate, threads=config.threads, task=task.name, device=config.device, runtime=config.runtime)
    if cand.task != task.name:
        raise EdgekitError(f"the candidate is a {cand.task} model but the original is {task.name}", "compare models of one task")
    outs = {}
    for name, sess in (("original", ref), ("candidate", cand)):
        with progress.step(f"Evaluating {name} ({sess.name})", total=len(examples)) as step:
            outs[name] = _collect(sess, tokenizer, examples, config, step)
    om = _task_metrics(task.name, outs["original"], examples.labels, ckpt.id2label)
    cm = _task_metrics(task.name, outs["candidate"], examples.labels, ckpt.id2label)
    agreement = _agreement(task.name, outs["original"], outs["candidate"])
    checks = _checks(task.name, task.labeled_metric, om, cm, agreement, gate)
    return VerifyReport(
        task=task.name, original=str(ckpt.path), candidate=str(Path(candidate).resolve()),
        runtimes={"original": ref.name, "candidate": cand.name},
        data={"path": examples.source, "text_column": examples.text_column, "label_column": examples.label_column},
        n_examples=len(examples), original_metrics=om, candidate_metrics=cm, agreement=agreement,
        checks=[c.__dict__ for c in checks], passed=all(c.passed for c in checks),
        seconds=time.perf_counter() - t0, config={**config.__dict__, "gate": gate.__dict__},
    )
