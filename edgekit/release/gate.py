"""The regression gate: a run (or release) against a baseline run (or release), for CI.

Three checks: accuracy may drop by at most N points; the INT8 model may grow by at most a fraction; each
variant's p50 latency may regress by at most a fraction, compared only between benchmarks whose environment
blocks match (``benchmarks.environment.comparable``). Latency from different machines, threads or library
versions says nothing about the change under test, so then the gate prints a warning and gives no latency
verdict rather than a wrong one. Each side may be a compress ``report.json``, a release ``manifest.json``, a
folder holding one, or a release ``.tar.gz``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import field_validator

from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option, parse_fraction
from edgekit.reports import Cell, FAIL, PASS, RenderedReport, SCHEMA_VERSION, Section, WARN, fmt_bytes

EPS = 1e-9  # float noise in "100.0 - 99.5 <= 0.5"


class RegressionGateConfig(StageConfig):
    max_accuracy_drop: float = option(0.5, "Largest allowed drop of the task metric, in absolute points.", ge=0)
    max_latency_regression: float = option(
        0.10, "Largest allowed p50 slow-down per variant (10% or 0.1); judged only on matching environments.",
        fraction=True)
    max_size_growth: float = option(0.05, "Largest allowed growth of the INT8 model size (5% or 0.05).", fraction=True)

    @field_validator("max_latency_regression", "max_size_growth", mode="before")
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
        from junit_xml import TestCase, TestSuite, to_xml_report_string

        cases = []
        for c, row in zip(self.checks, self.rows()):
            tc = TestCase(c["name"], classname="edgekit.release.gate",
                          stdout=f"baseline {row[1]}, current {row[2]}, delta {row[3]}, allowed {row[4]}")
            if c["passed"] is False:
                tc.add_failure_info(message=f"{c['name']}: {row[3]} (allowed {row[4]})")
            elif c["passed"] is None:
                tc.add_skipped_info(message=c.get("note") or "no verdict")
            cases.append(tc)
        suite = TestSuite("edgekit gate", cases, properties={"current": self.current, "baseline": self.baseline})
        Path(path).write_text(to_xml_report_string([suite]), encoding="utf-8")


@dataclass
class RunFigures:
    path: str
    kind: str
    task: str | None
    accuracy: dict | None  # the verify block: original/candidate metrics, agreement, n_examples, data
    size_bytes: int | None
    bench: list  # [{"environment": ..., "variants": [{"name", "latency": {"p50_ms"}}]}]
    recipe: dict | None


def read_figures(path) -> RunFigures:
    from edgekit.release.bundle import read_run_json

    kind, d, p = read_run_json(path)
    try:
        if kind == "compress":
            acc, size = d.get("verify"), d["quantize"]["size_after"]
            bench, recipe = [d["bench"]] if d.get("bench") else [], (d.get("config") or {}).get("recipe")
        else:
            acc, size, bench, recipe = d.get("accuracy"), d["models"]["int8"]["size_bytes"], d.get("bench") or [], d.get("recipe")
        task = (acc or {}).get("task") or d.get("task") or (d.get("config") or {}).get("task")
    except (KeyError, TypeError) as e:
        raise EdgekitError(f"{p} lacks {e} (a truncated or hand-edited file?)", "use the file edgekit wrote") from None
    return RunFigures(str(p), kind, task, acc, size, bench, recipe)


def _metric(fig: RunFigures) -> tuple[str, float] | None:
    from edgekit.tasks import TASKS

    acc = fig.accuracy
    if not acc:
        return None
    labeled = TASKS[fig.task].labeled_metric if fig.task in TASKS else None
    if labeled and labeled in (acc.get("candidate_metrics") or {}):
        return labeled, float(acc["candidate_metrics"][labeled])
    agreement = acc.get("agreement") or {}
    for key in ("top1_agreement", "retrieval_agreement"):
        if key in agreement:
            return key, float(agreement[key])
    return None


def _check(name, unit, base, cur, delta, threshold, passed, note=None) -> dict:
    return {"name": name, "unit": unit, "baseline": base, "current": cur, "delta": delta, "threshold": threshold,
            "passed": passed, "note": note}


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


def _latency_checks(cur: RunFigures, base: RunFigures, limit: float, warnings: list) -> list[dict]:
    from edgekit.benchmarks.environment import comparable

    if not cur.bench or not base.bench:
        which = "current run" if not cur.bench else "baseline"
        warnings.append(f"the {which} has no benchmark: no latency verdict")
        return []
    checks = []
    for c in cur.bench:
        envc = c.get("environment") or {}
        matches = [b for b in base.bench if comparable(envc, b.get("environment") or {})]
        if not matches:
            other = base.bench[0].get("environment") or {}
            warnings.append(f"latency not compared: the benchmark environments differ (baseline vs current: "
                            f"{_env_differences(envc, other)}); run both on the same machine and setup for a latency verdict")
            continue
        b = matches[0]
        base_p50 = {v["name"]: v["latency"]["p50_ms"] for v in b.get("variants", [])}
        device = envc.get("device", "cpu")
        for v in c.get("variants", []):
            if v["name"] not in base_p50 or not base_p50[v["name"]]:
                continue
            p0, p1 = base_p50[v["name"]], v["latency"]["p50_ms"]
            growth = p1 / p0 - 1
            checks.append(_check(f"p50 latency: {v['name']}" + (f" [{device}]" if len(cur.bench) > 1 else ""), "ms",
                                 p0, p1, growth, f"<= +{100 * limit:g}%", growth <= limit + EPS))
    return checks


def _recipe_changes(cur: dict | None, base: dict | None) -> list[dict]:
    from edgekit.recipe import PATH_FIELDS, flatten

    a, b = flatten(cur or {}), flatten(base or {})
    return [{"key": k, "baseline": b.get(k), "current": a.get(k)} for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in PATH_FIELDS]


def regression_gate(current, baseline, config: RegressionGateConfig | None = None) -> RegressionGateReport:
    """Compare ``current`` with ``baseline``; ``report.passed`` is the verdict (no verdict is not a failure)."""
    cfg = config or RegressionGateConfig()
    cur, base = read_figures(current), read_figures(baseline)
    if cur.task and base.task and cur.task != base.task:
        raise EdgekitError(f"the current run is {cur.task} but the baseline is {base.task}", "compare runs of one model")
    checks, warnings = [], []
    mc, mb = _metric(cur), _metric(base)
    if mb is None and mc is None:
        warnings.append("neither run was verified on evaluation data: no accuracy verdict")
    elif mc is None:
        checks.append(_check("accuracy", "points", mb[1], None, None, f"drop <= {cfg.max_accuracy_drop:g} pt", False,
                             "the current run has no accuracy figures (compress ran without --data)"))
    elif mb is None or mb[0] != mc[0]:
        warnings.append(f"the baseline has no {mc[0]} figure to compare with: no accuracy verdict")
    else:
        drop = mb[1] - mc[1]
        checks.append(_check(mc[0], "points", mb[1], mc[1], mc[1] - mb[1], f"drop <= {cfg.max_accuracy_drop:g} pt",
                             drop <= cfg.max_accuracy_drop + EPS))
        nc, nb = cur.accuracy.get("n_examples"), base.accuracy.get("n_examples")
        if nc != nb:
            warnings.append(f"the runs were evaluated on different data ({nb} vs {nc} examples): the accuracy delta "
                            "mixes the change with the data")
    if cur.size_bytes and base.size_bytes:
        growth = cur.size_bytes / base.size_bytes - 1
        checks.append(_check("INT8 model size", "bytes", base.size_bytes, cur.size_bytes, growth,
                             f"<= +{100 * cfg.max_size_growth:g}%", growth <= cfg.max_size_growth + EPS))
    checks += _latency_checks(cur, base, cfg.max_latency_regression, warnings)
    return RegressionGateReport(cur.path, base.path, checks, warnings, all(c["passed"] is not False for c in checks),
                                cfg.to_dict(), _recipe_changes(cur.recipe, base.recipe))
