"""The regression gate: a run (or release) against a baseline run (or release), for CI.

Three checks: accuracy may drop by at most N points (on the same evaluation data: its sha256 is compared); the
INT8 model may grow by at most a fraction; the shipped model's p50 latency may regress by at most a fraction,
judged only when both models are timed here, interleaved, by ``release.rebench`` (``--rebench``, the default
when both sides' models are on disk). Latency recorded by different runs is shown and never gated: the same
recipe run three times on one machine gave +35.5%, +19.9% and +19.3%.

No fail-open: a check that cannot be made is a check without verdict (a JUnit <skipped> case) and a warning;
``require`` turns it into a failure, and a gate in which nothing could be compared fails. Each side may be a
compress ``report.json``, a release ``manifest.json``, a folder holding one, or a release ``.tar.gz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option, parse_fraction
from edgekit.reports import Cell, FAIL, PASS, RenderedReport, SCHEMA_VERSION, Section, WARN, fmt_bytes


class RegressionGateConfig(StageConfig):
    max_accuracy_drop: float = option(0.5, "Largest allowed drop of the task metric, in absolute points.", ge=0)
    max_latency_regression: float = option(
        0.10, "Fail threshold of the rebenched p50 slow-down, current/baseline - 1 (10% or 0.1); latency from "
        "different runs is shown, never gated.", fraction=True)
    max_size_growth: float = option(0.05, "Largest allowed growth of the INT8 model size (5% or 0.05).", fraction=True)
    max_ppl_increase: float = option(0.05, "text-generation: largest allowed perplexity increase over the baseline's "
                                     "(5% or 0.05).", fraction=True)
    rebench: Optional[bool] = option(
        None, "Time the baseline's shipped model and the current one interleaved, here, for the latency verdict "
        "(default: when both sides' models are on disk: a run folder, a bundle folder or tarball).",
        flag="--rebench/--no-rebench")
    latency_warn: float = option(0.05, "Warn threshold of the rebenched p50 slow-down (5% or 0.05).", fraction=True)
    latency_noise_floor: float = option(
        0.02, "A rebenched slow-down within this fraction, or within the spread measured across rounds, never "
        "fails or warns.", fraction=True)
    rebench_rounds: int = option(10, "Interleaved rounds of the rebench (the noise is measured across them; from 8 on, "
                                 "the most disturbed round on each side is left out of it).", ge=2)
    all_variants: bool = option(False, "Gate every variant's latency (the FP32 ONNX model too), not only the "
                                "shipped INT8 one.")
    require: list[Literal["accuracy", "latency", "size"]] = option(
        help="A check named here (accuracy, latency, size; comma-separated or repeated) that cannot be made fails "
        "the gate.", metavar="CHECKS", default_factory=list)
    allow_missing_baseline: bool = option(
        False, "A --baseline that does not exist (the first run) passes with every check skipped, instead of exit 2.")
    allow_data_change: bool = option(
        False, "Compare accuracy measured on different evaluation data (another sha256), instead of refusing.")

    @field_validator("max_latency_regression", "max_size_growth", "latency_warn", "latency_noise_floor",
                     "max_ppl_increase", mode="before")
    @classmethod
    def _fraction(cls, v):
        return parse_fraction(v)


_VERDICT = {True: Cell("pass", PASS), False: Cell("FAIL", FAIL), None: Cell("no verdict", WARN)}


def _check_row(c: dict) -> list:
    """One check as table cells: name, baseline, current, delta, threshold, verdict."""
    def fmt(x):
        if x is None:
            return "-"
        return fmt_bytes(int(x)) if c["unit"] == "bytes" else f"{x:.4g}" + (" ms" if c["unit"] == "ms" else "")

    if c["delta"] is None:
        delta = "-"
    else:
        delta = f"{c['delta']:+.2f} pt" if c["unit"] == "points" else f"{100 * c['delta']:+.1f}%"
    return [c["name"], fmt(c["baseline"]), fmt(c["current"]), delta, str(c["threshold"]), _VERDICT[c["passed"]]]


@dataclass
class RegressionGateReport(RenderedReport):
    current: str
    baseline: str
    checks: list  # {name, unit, baseline, current, delta, threshold, passed (None: no verdict), note}
    warnings: list
    passed: bool
    config: dict = field(default_factory=dict)
    recipe_changes: list = field(default_factory=list)
    # the rebench (release.rebench): per variant both p50s, their ratio, each round's ratio; its environment
    # (library versions, threads) and method. None when latency was not rebenched.
    rebench: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def __bool__(self) -> bool:
        return self.passed

    def rows(self) -> list[list[str]]:
        """The checks as plain text: name, baseline, current, delta, threshold, verdict."""
        return [[x.text if isinstance(x, Cell) else x for x in _check_row(c)] for c in self.checks]

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        verdict = PASS if d["passed"] else FAIL
        out = [Section(f"edgekit gate: {'PASSED' if d['passed'] else 'FAILED'}", status=verdict,
                       notes=[f"Current `{d['current']}` against baseline `{d['baseline']}`."]),
               Section(None, ["check", "baseline", "current", "delta", "threshold", "verdict"],
                       [_check_row(c) for c in d.get("checks") or []], align="lrrrrl",
                       notes=[Cell(w, WARN) for w in d.get("warnings") or []])]
        if d.get("recipe_changes"):
            out.append(Section("Recipe changes", ["key", "baseline", "current"],
                               [[c["key"], c["baseline"], c["current"]] for c in d["recipe_changes"]],
                               align="lll", level=3, collapsed=True))
        return out

    def write_junit(self, path) -> None:
        from edgekit.reports import JunitCase, write_junit

        cases = []
        for c, row in zip(self.checks, self.rows()):
            figures = f"baseline {row[1]}, current {row[2]}, delta {row[3]}, allowed {row[4]}"
            failure = f"{c['name']}: {row[3]} (allowed {row[4]})" if c["passed"] is False else None
            detail = "\n".join(x for x in (c.get("note"), figures) if x)
            skipped = (c.get("note") or "no verdict") if c["passed"] is None else None
            # a check's own duration (a rebench), else 0: comparing two recorded figures is instant
            cases.append(JunitCase(c["name"], "edgekit.release.gate", c.get("seconds") or 0.0, failure=failure,
                                   failure_detail=detail, skipped=skipped, output=figures))
        write_junit(path, "edgekit gate", cases, {"current": self.current, "baseline": self.baseline})


@dataclass
class RunFigures:
    path: str
    kind: str
    task: str | None
    accuracy: dict | None  # the verify block: original/candidate metrics, agreement, n_examples, data
    size_bytes: int | None
    bench: list  # [{"environment": ..., "variants": [{"name", "latency": {"p50_ms"}}]}]
    recipe: dict | None
    accuracy_field: str = "verify"  # where ``accuracy`` sits in the file (for messages naming a field)
    # variant (int8, fp32) -> its model folder on disk, or for a tarball its path inside it; {}: a lone file
    models: dict = field(default_factory=dict)
    tarball: str | None = None  # the .tar.gz the figures (and ``models``) come from
    data_sha256: str | None = None  # of the evaluation data the accuracy was measured on (None: not known)


# The fields the gate reads, with their JSON types. A hand-edited or foreign file with a string where a number
# belongs is refused naming the field (exit 2) before any arithmetic, rather than failing inside it (exit 3).
# strict: "12" is not a number; extra fields are other readers' business.
class _Shape(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class _Latency(_Shape):
    p50_ms: Optional[float] = Field(None, ge=0)


class _Variant(_Shape):
    name: str
    latency: Optional[_Latency] = None  # encoders
    tpot_p50_ms: Optional[float] = Field(None, ge=0)  # decoders: time per output token


class _Environment(_Shape):
    libraries: Optional[dict] = None


class _Bench(_Shape):
    environment: Optional[_Environment] = None
    variants: list[_Variant] = []


class _Accuracy(_Shape):
    task: Optional[str] = None
    n_examples: Optional[int] = None
    candidate_metrics: Optional[dict] = None  # the values used are checked where used: keys depend on the task
    agreement: Optional[dict] = None


class _Config(_Shape):
    task: Optional[str] = None
    recipe: Optional[dict] = None


class _Quantize(_Shape):
    size_after: int = Field(ge=0)


class _CompressFigures(_Shape):
    task: Optional[str] = None
    verify: Optional[_Accuracy] = None
    quantize: _Quantize
    bench: Optional[_Bench] = None
    config: Optional[_Config] = None


class _Int8(_Shape):
    size_bytes: int = Field(ge=0)


class _Models(_Shape):
    int8: _Int8


class _ReleaseFigures(_Shape):
    task: Optional[str] = None
    accuracy: Optional[_Accuracy] = None
    models: _Models
    bench: Optional[list[_Bench]] = None
    recipe: Optional[dict] = None
    config: Optional[_Config] = None


def _json_type(x) -> str:
    return {bool: "a boolean", str: "a string", int: "a number", float: "a number", list: "a list",
            dict: "an object", type(None): "null"}.get(type(x), type(x).__name__)


def _check_types(d: dict, kind: str, p) -> None:
    try:
        (_CompressFigures if kind == "compress" else _ReleaseFigures).model_validate(d)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        if err["type"] == "missing":
            raise EdgekitError(f"{p} lacks the field {where} (a truncated or hand-edited file?)",
                               "use the file edgekit wrote") from None
        found = _json_type(err["input"])
        shown = f" {repr(err['input'])[:40]}" if found not in ("an object", "a list") else ""
        t = err["type"]
        wanted = ("an object" if t in ("dict_type", "model_type", "model_attributes_type") else "a list" if t == "list_type"
                  else "a whole number" if t.startswith("int") else "a finite number" if t.startswith(("float", "finite"))
                  else "a string" if t.startswith("string") else "a number >= 0" if t == "greater_than_equal"
                  else err["msg"].lower())
        raise EdgekitError(f"the field {where} in {p} is {found}{shown}, not {wanted}",
                           "use the file edgekit wrote, or fix that field") from None


def _number(value, field: str, p) -> float:
    """A metric the gate compares: a finite number, or one sentence naming the field."""
    import math

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EdgekitError(f"the field {field} in {p} is {_json_type(value)} {repr(value)[:40]}, not a finite number",
                           "use the file edgekit wrote, or fix that field")
    return float(value)


def read_figures(path) -> RunFigures:
    from edgekit.release.bundle import read_run_json

    kind, d, p = read_run_json(path)
    _check_types(d, kind, p)
    try:
        if kind == "compress":
            acc, size = d.get("verify"), d["quantize"]["size_after"]
            bench, recipe = [d["bench"]] if d.get("bench") else [], (d.get("config") or {}).get("recipe")
        else:
            acc, size, bench, recipe = d.get("accuracy"), d["models"]["int8"]["size_bytes"], d.get("bench") or [], d.get("recipe")
        task = (acc or {}).get("task") or d.get("task") or (d.get("config") or {}).get("task")
    except (KeyError, TypeError) as e:
        raise EdgekitError(f"{p} lacks {e} (a truncated or hand-edited file?)", "use the file edgekit wrote") from None
    models, data = _shipped_models(kind, d, p), (acc or {}).get("data") or {}
    return RunFigures(str(p), kind, task, acc, size, bench, recipe, "verify" if kind == "compress" else "accuracy",
                      models, str(p) if p.name.endswith((".tar.gz", ".tgz")) else None, _data_sha256(data))


def _metric(fig: RunFigures) -> tuple[str, float] | None:
    from edgekit.tasks import TASKS

    acc = fig.accuracy
    if not acc:
        return None
    labeled = TASKS[fig.task].labeled_metric if fig.task in TASKS else None
    if labeled and labeled in (acc.get("candidate_metrics") or {}):
        return labeled, _number(acc["candidate_metrics"][labeled], f"{fig.accuracy_field}.candidate_metrics.{labeled}",
                                fig.path)
    agreement = acc.get("agreement") or {}
    for key in ("top1_agreement", "retrieval_agreement"):
        if key in agreement:
            return key, _number(agreement[key], f"{fig.accuracy_field}.agreement.{key}", fig.path)
    return None


KINDS = {"points": "accuracy", "perplexity": "accuracy", "bytes": "size", "ms": "latency"}  # --require, by unit


def _check(name, unit, base, cur, delta, threshold, passed, note=None) -> dict:
    return {"name": name, "unit": unit, "baseline": base, "current": cur, "delta": delta, "threshold": threshold,
            "passed": passed, "note": note, "kind": KINDS.get(unit)}


def _skip(checks: list, warnings: list, name: str, unit: str, reason: str, base=None, cur=None, delta=None,
          threshold: str = "-") -> None:
    """A check that cannot be made: a case without verdict (JUnit <skipped>) and a warning, never a silent pass."""
    checks.append(_check(name, unit, base, cur, delta, threshold, None, reason))
    warnings.append(f"{name}: not checked: {reason}")


def _env_differences(a: dict, b: dict) -> str:
    from edgekit.benchmarks.environment import COMPARED_KEYS

    diffs = []
    for k in COMPARED_KEYS:
        if a.get(k) != b.get(k):
            if k == "libraries":
                libs = a.get(k) or {}
                other = b.get(k) or {}
                diffs += [f"{lib} {other.get(lib)} vs {libs.get(lib)}" for lib in sorted(set(libs) | set(other))
                          if libs.get(lib) != other.get(lib)]
            else:
                diffs.append(f"{k} {b.get(k)!r} vs {a.get(k)!r}")
    return "; ".join(diffs) or "unknown difference"


def _data_sha256(data: dict) -> str | None:
    """The evaluation data's sha256: recorded (a release manifest), else of the file the run names, if it is here."""
    from edgekit.artifacts import sha256_file

    if isinstance(data.get("sha256"), str):
        return data["sha256"]
    p = Path(data["path"]) if isinstance(data.get("path"), str) and data["path"] else None
    return sha256_file(p) if p is not None and p.is_file() else None


def _shipped_models(kind: str, d: dict, p: Path) -> dict:
    from edgekit.release.rebench import shipped_models

    return shipped_models(kind, d, p)


def _rebench_variants(cur: RunFigures, base: RunFigures, cfg: RegressionGateConfig) -> tuple[list[str], str | None]:
    """(variants to rebench, None) or ([], why latency cannot be rebenched)."""
    if cfg.rebench is False:
        return [], "--no-rebench"
    missing = [f"the {side} ({fig.path}) is a lone file without its models" for side, fig in
               (("baseline", base), ("current run", cur)) if "int8" not in fig.models]
    if missing:
        if cfg.rebench:
            raise EdgekitError(f"--rebench needs both sides' models on disk, but {' and '.join(missing)}",
                               "pass the run folder, the release bundle folder or its .tar.gz, or --no-rebench")
        return [], "; ".join(missing)
    return ["int8"] + (["fp32"] if cfg.all_variants and "fp32" in cur.models and "fp32" in base.models else []), None


def _latency_checks(cur: RunFigures, base: RunFigures, cfg: RegressionGateConfig, checks: list, warnings: list,
                    progress=None) -> dict | None:
    """Latency: rebenched here when both models are on disk (gated); otherwise the figures each run recorded,
    shown but never gated (different runs, machines, load). Returns the rebench block, or None."""
    variants, why_not = _rebench_variants(cur, base, cfg)
    if variants:
        from edgekit.release.rebench import judge, rebench

        block = rebench(cur, base, variants, cfg.rebench_rounds, progress)
        for v in block["variants"]:
            passed, threshold, message = judge(v, cfg.max_latency_regression, cfg.latency_warn, cfg.latency_noise_floor)
            measure = "p50 " + v.get("measure", "latency")
            checks.append(_check(f"{measure}: {v['variant']} (rebenched)", "ms", v["baseline_p50_ms"],
                                 v["current_p50_ms"], v["ratio"] - 1, threshold, passed, message))
            if message:
                warnings.append(message if passed is not False else f"latency regression: {message}")
        return block
    reason = f"not rebenched ({why_not}); latency measured on different runs is not gated"
    n = len(checks)
    for c in cur.bench:
        envc = c.get("environment") or {}
        b = next((b for b in base.bench if (b.get("environment") or {}).get("device", "cpu") == envc.get("device", "cpu")),
                 None)
        if b is None:
            continue
        from edgekit.benchmarks.environment import comparable

        base_p50 = {v["name"]: _p50(v) for v in b.get("variants", [])}
        device = f" [{envc.get('device', 'cpu')}]" if len(cur.bench) > 1 else ""
        benv = b.get("environment") or {}
        note = reason if comparable(envc, benv) else \
            f"{reason} (the environments differ too, baseline vs current: {_env_differences(envc, benv)})"
        for v in c.get("variants", []):
            if not cfg.all_variants and not _shipped(v["name"]):
                continue  # only the shipped model, as in a rebench
            p0, p1 = base_p50.get(v["name"]), _p50(v)
            growth = p1 / p0 - 1 if p0 and p1 is not None else None
            checks.append(_check(f"p50 latency: {v['name']}{device}", "ms", p0, p1, growth,
                                 "not gated: measured on different runs", None, note))
    if len(checks) == n:
        which = ("the current run recorded no benchmark" if not cur.bench else "the baseline recorded no benchmark"
                 if not base.bench else "the runs recorded no benchmark of one device to show")
        _skip(checks, warnings, "p50 latency", "ms", f"{reason}, and {which}")
    else:
        warnings.append(f"p50 latency: {reason}: shown for information, no verdict")
    return None


def _p50(v: dict) -> float | None:
    """A variant's p50 in ms: of one run (encoders), of one decode step (decoders)."""
    return (v.get("latency") or {}).get("p50_ms") if v.get("latency") else v.get("tpot_p50_ms")


def _shipped(name: str) -> bool:
    return "INT8" in name or "INT4" in name


def _recipe_changes(cur: dict | None, base: dict | None) -> list[dict]:
    from edgekit.recipe import PATH_FIELDS, flatten

    a, b = flatten(cur or {}), flatten(base or {})
    return [{"key": k, "baseline": b.get(k), "current": a.get(k)} for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in PATH_FIELDS]


def regression_gate(current, baseline, config: RegressionGateConfig | None = None,
                    progress=None) -> RegressionGateReport:
    """Compare ``current`` with ``baseline``; ``report.passed`` is the verdict. A check that cannot be made is a
    check without verdict and a warning; one named in ``require`` fails instead, and a gate where nothing at all
    could be compared fails (except for a missing baseline with ``allow_missing_baseline``)."""
    from edgekit.metrics import meets  # verify's comparison: a drop of exactly the threshold passes

    cfg = config or RegressionGateConfig()
    if not Path(baseline).exists():
        return _missing_baseline(current, baseline, cfg)
    cur, base = read_figures(current), read_figures(baseline)
    if cur.task and base.task and cur.task != base.task:
        raise EdgekitError(f"the current run is {cur.task} but the baseline is {base.task}", "compare runs of one model")
    checks, warnings = [], []
    mc, mb = _metric(cur), _metric(base)
    if mc is not None and mb is not None:
        _compare_data(cur, base, cfg, warnings)
    if mb is None and mc is None:
        _skip(checks, warnings, "accuracy", "points", "neither run was verified on evaluation data (compress without --data)")
    elif mc is None:
        checks.append(_check("accuracy", "points", mb[1], None, None, f"drop <= {cfg.max_accuracy_drop:g} pt", False,
                             "the current run has no accuracy figures (compress ran without --data)"))
    elif mb is None or mb[0] != mc[0]:
        _skip(checks, warnings, mc[0], "points", f"the baseline has no {mc[0]} figure to compare with", cur=mc[1],
              threshold=f"drop <= {cfg.max_accuracy_drop:g} pt")
    elif mc[0] == "perplexity":  # decoders: lower is better, compared as a relative increase
        growth = mc[1] / mb[1] - 1 if mb[1] else float("inf")
        checks.append(_check("perplexity", "perplexity", mb[1], mc[1], growth,
                             f"<= +{100 * cfg.max_ppl_increase:g}%", meets(growth, "<=", cfg.max_ppl_increase)))
    else:
        drop = mb[1] - mc[1]
        checks.append(_check(mc[0], "points", mb[1], mc[1], mc[1] - mb[1], f"drop <= {cfg.max_accuracy_drop:g} pt",
                             meets(drop, "<=", cfg.max_accuracy_drop)))
        nc, nb = cur.accuracy.get("n_examples"), base.accuracy.get("n_examples")
        if nc != nb:
            warnings.append(f"the runs were evaluated on different data ({nb} vs {nc} examples): the accuracy delta "
                            "mixes the change with the data")
    if cur.size_bytes and base.size_bytes:
        growth = cur.size_bytes / base.size_bytes - 1
        checks.append(_check("INT8 model size", "bytes", base.size_bytes, cur.size_bytes, growth,
                             f"<= +{100 * cfg.max_size_growth:g}%", meets(growth, "<=", cfg.max_size_growth)))
    else:
        _skip(checks, warnings, "INT8 model size", "bytes", "the " + ("current run" if not cur.size_bytes else "baseline")
              + " records no INT8 model size", base.size_bytes, cur.size_bytes)
    rebenched = _latency_checks(cur, base, cfg, checks, warnings, progress)
    _apply_require(checks, cfg.require)
    if all(c["passed"] is None for c in checks):
        checks.append(_check("anything compared", None, None, None, None, "at least one check with a verdict", False,
                             "nothing could be compared: every check above was skipped"))
        warnings.append("nothing could be compared between the current run and the baseline: the gate fails")
    return RegressionGateReport(cur.path, base.path, checks, warnings, all(c["passed"] is not False for c in checks),
                                cfg.to_dict(), _recipe_changes(cur.recipe, base.recipe), rebenched)


def _apply_require(checks: list, require: list) -> None:
    """--require: a named check that could not be made fails, its reason kept."""
    for c in checks:
        if c["passed"] is None and c.get("kind") in require:
            c["passed"] = False
            c["note"] = f"required (--require {c['kind']}) but not checked: {c['note']}"


def _missing_baseline(current, baseline, cfg: RegressionGateConfig) -> RegressionGateReport:
    """No baseline yet (the first run): exit 2, or with ``allow_missing_baseline`` every check skipped."""
    if not cfg.allow_missing_baseline:
        raise EdgekitError(f"the baseline {baseline} does not exist",
                           "point --baseline at the previous release (its manifest.json, bundle or .tar.gz), or pass "
                           "--allow-missing-baseline for the first run, when there is none")
    cur = read_figures(current)  # a bad current run is still refused
    reason = f"no baseline: {baseline} does not exist (--allow-missing-baseline)"
    checks, warnings = [], []
    for name, unit, value in (("accuracy", "points", (_metric(cur) or (None, None))[1]),
                              ("INT8 model size", "bytes", cur.size_bytes), ("p50 latency", "ms", None)):
        checks.append(_check(name, unit, None, value, None, "-", None, reason))
    warnings.append(f"{reason}: every check is skipped and the gate passes; the next run has this one to compare with")
    return RegressionGateReport(cur.path, str(baseline), checks, warnings, True, cfg.to_dict())


def _compare_data(cur: RunFigures, base: RunFigures, cfg: RegressionGateConfig, warnings: list) -> None:
    """The accuracy of two runs compares the change only when both were measured on the same data (sha256)."""
    if cur.data_sha256 and base.data_sha256 and cur.data_sha256 != base.data_sha256:
        what = (f"the evaluation data differ (sha256 {base.data_sha256[:12]}… in the baseline, {cur.data_sha256[:12]}… "
                "in the current run)")
        if not cfg.allow_data_change:
            raise EdgekitError(f"{what}, so an accuracy delta would mix the change with the data",
                               "evaluate both on the same file, or pass --allow-data-change to compare anyway")
        warnings.append(f"{what}; compared anyway (--allow-data-change): the accuracy delta mixes the change with the data")
    elif not (cur.data_sha256 and base.data_sha256):
        which = "baseline" if not base.data_sha256 else "current run"
        warnings.append(f"the evaluation data of the {which} is not on disk and has no recorded sha256: not known to "
                        "be the same data as the other side's")
