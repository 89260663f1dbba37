"""The search's record: ``trials.jsonl`` (one line per finished trial, appended as each ends), the typed
``SearchReport`` (``search.json``, ``report.md``) and the Pareto plot (``pareto.png``)."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.reports import FAIL, PASS, WARN, Cell, RenderedReport, SCHEMA_VERSION, Section, fmt_mib

TRIALS = "trials.jsonl"
REPORT_JSON, REPORT_MD, PARETO_PNG, BEST_RECIPE, BEST_RUN = "search.json", "report.md", "pareto.png", "recipe.yaml", "best"
OBJECTIVE_LABELS = {"latency": "p50 latency (x the original's ONNX FP32)", "size": "model size (MiB)",
                    "memory": "peak RSS (MiB)", "tokens-per-s": "time per output token (x the original's ONNX FP32)"}


class TrialLog:
    """``trials.jsonl``: a line per finished trial, appended and flushed to disk when it ends (a crash or Ctrl-C
    loses at most the trial that was running); a torn last line is ignored on reading."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def pareto_numbers(trials: list[dict]) -> list[int]:
    """The passing trials no other passing trial beats on both objectives (lower is better on each)."""
    pts = [(t["number"], t["objectives"]) for t in trials if t.get("state") == "passed" and t.get("objectives")]
    front = []
    for n, (a, b) in pts:
        dominated = any((a2 <= a and b2 <= b) and (a2 < a or b2 < b) for _, (a2, b2) in pts)
        if not dominated:
            front.append(n)
    return sorted(front, key=lambda n: next(o for m, o in pts if m == n)[0])


def _verdict(t: dict) -> Cell:
    state = t.get("state")
    if state == "passed":
        return Cell("pass", PASS)
    if state == "failed":
        return Cell("FAIL", FAIL)
    return Cell(state or "?", WARN)


def _objective_cell(t: dict, objective: str) -> str:
    m = t.get("metrics") or {}
    if objective == "latency":
        if "latency_ratio" in m:
            return f"{m['latency_ratio']:.3f}x ({m['p50_ms']:.2f} ms)"
        if "ttft_ratio" in m:
            return f"{m['ttft_ratio']:.3f}x ({m['ttft_ms']:.0f} ms)"
    if objective == "tokens-per-s" and "tokens_per_s" in m:
        return f"{m['tokens_per_s']:.1f}/s ({m['tpot_ratio']:.3f}x)"
    if objective == "memory" and "rss_peak_bytes" in m:
        return fmt_mib(m["rss_peak_bytes"])
    if objective == "size" and "size_bytes" in m:
        return fmt_mib(m["size_bytes"])
    return "-"


def mended(c: dict) -> str:
    """What a trial's culprit retries changed ("2 nodes in float, 1 node per-channel", or empty), for the trial
    table and the trial line on screen."""
    parts = [f"{len(c[k])} node{'s' * (len(c[k]) != 1)} {label}"
             for k, label in (("kept_in_float", "in float"), ("per_channel", "per-channel")) if c.get(k)]
    return ", ".join(parts)


def _check_cell(t: dict) -> str:
    checks = (t.get("verify") or {}).get("checks") or []
    if not checks:
        return "-"
    c = checks[0]
    return f"{c['name']} {c['value']:.4g} ({c['comparison']} {c['threshold']:.4g})"


@dataclass
class SearchReport(RenderedReport):
    source: str
    output: str
    task: str
    state: str  # running | complete | budget | exhausted | interrupted
    objective: str
    strategy: str
    passed: bool  # a variant passed the gate
    best: dict | None  # the chosen trial (number, recipe, metrics, verify, culprits)
    trials: list  # one summary per trial: number, description, state, objectives, metrics, checks
    pareto: list  # trial numbers on the front
    confirmation: dict | None  # the finalists re-timed interleaved in one run
    space: dict
    config: dict
    environment: dict
    best_run: str | None = None  # OUT/best: the winner as a normal compress run folder
    seconds: float = 0.0
    notes: list = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        obj = d["objective"]
        best = d.get("best")
        n = len(d.get("trials") or [])
        computed = sum(1 for t in d["trials"] if not t.get("earlier"))
        head = (f"edgekit search: {'best passing variant found' if d['passed'] else 'NO variant passed the gate'} "
                f"({n} trials, {d['state']})")
        notes = [f"Objective: {OBJECTIVE_LABELS.get(obj, obj)}, lower is better; strategy {d['strategy']}; "
                 f"{computed} trials computed in this run, {n - computed} from an earlier run; {d['seconds']:.0f} s."]
        if best:
            notes.append(f"Best: trial {best['number']} ({best['description']}): {_objective_cell(best, obj)}, "
                         f"{_check_cell(best)}.")
            c = best.get("culprits") or {}
            for what, nodes in (("Kept in float", c.get("kept_in_float")), ("Given per-channel scales", c.get("per_channel"))):
                if nodes:
                    notes.append(f"{what} after the culprit search: " + ", ".join(f"`{k}`" for k in nodes) + ".")
        if d.get("best_run"):
            notes.append(f"Run folder: `{d['best_run']}`; recipe: `{Path(d['output']) / BEST_RECIPE}` "
                         f"(`edgekit compress CKPT -o OUT --recipe {BEST_RECIPE}` reproduces it).")
        notes += [f"Note: {x}" for x in d.get("notes") or []]
        out = [Section(head, notes=notes, status=PASS if d["passed"] else FAIL, level=1, key="search")]
        front = set(d.get("pareto") or [])
        rows = []
        for t in sorted(d["trials"], key=lambda t: t["number"]):
            m = t.get("metrics") or {}
            rows.append([t["number"], t.get("description", ""), _verdict(t), _check_cell(t), _objective_cell(t, obj),
                         fmt_mib(m.get("size_bytes")), "yes" if t["number"] in front else "",
                         mended(t.get("culprits") or {}),
                         "reused" if t.get("reused") else "earlier run" if t.get("earlier") else
                         (t.get("error") or "")[:80]])
        out.append(Section("Trials", ["#", "recipe", "gate", "first check", "objective", "size (MiB)", "Pareto",
                                      "nodes mended", "note"], rows, align="rlllrrlrl", level=2, key="trials"))
        conf = d.get("confirmation")
        if conf:
            crow = [[v["number"], v["description"], f"{v['p50_ms']:.3f}" if v.get("p50_ms") is not None else "-",
                     f"{v['ratio']:.3f}x" if v.get("ratio") is not None else "-"] for v in conf["variants"]]
            out.append(Section("Finalists re-timed in one interleaved run", ["#", "recipe", "p50 ms", "vs reference"],
                               crow, notes=[conf.get("method", "")], align="rlrr", level=2))
        culprits = ((best or {}).get("culprits") or {}).get("nodes") or []
        if culprits:
            out.append(Section("Culprit ranking of the best trial (isolated damage of each quantized node)",
                               ["node", "op", "layer", "error"],
                               [[c["name"], c.get("op_type") or "", "-" if c.get("layer") is None else c["layer"],
                                 f"{c['error']:.4g}"] for c in culprits[:10]], level=3))
        return out


def plot_pareto(trials: list[dict], front: list[int], best: int | None, objective: str, path: Path) -> bool:
    """Accuracy against the objective, marker area by model size, the front drawn through the passing trials
    nobody beats; False (and no file) when there is nothing to draw or matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pts = [t for t in trials if t.get("objectives") and (t.get("verify") or {}).get("checks")]
    if not pts:
        return False
    check = pts[0]["verify"]["checks"][0]
    # A labeled metric's drop is shown as the metric itself (accuracy %), the gate as the original minus it
    metric = check["name"].removesuffix("_drop_points") if check["name"].endswith("_drop_points") else None
    original = ((pts[0]["verify"].get("original_metrics") or {}).get(metric)) if metric else None

    def y(t):
        value = t["verify"]["checks"][0]["value"]
        return original - value if original is not None else value
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    sizes = [max((t.get("metrics") or {}).get("size_bytes", 0), 1) for t in pts]
    scale = 400 / max(sizes)
    for state, color, label in (("passed", "tab:green", "passes the gate"), ("failed", "tab:red", "misses the gate")):
        sel = [(t, s) for t, s in zip(pts, sizes) if t["state"] == state]
        if sel:
            ax.scatter([t["objectives"][0] for t, _ in sel], [y(t) for t, _ in sel],
                       s=[20 + s * scale for _, s in sel], c=color, alpha=0.55, edgecolors="black", linewidths=0.5,
                       label=label)
    on_front = sorted((t for t in pts if t["number"] in front), key=lambda t: t["objectives"][0])
    if on_front:
        ax.plot([t["objectives"][0] for t in on_front], [y(t) for t in on_front],
                color="tab:green", lw=1, ls="--", label="Pareto front")
    for t in pts:
        if t["number"] == best:
            ax.scatter([t["objectives"][0]], [y(t)], marker="*", s=300, c="gold",
                       edgecolors="black", zorder=5, label=f"chosen (trial {best})")
    if original is not None:
        ax.axhline(original, color="grey", lw=0.8, ls="--", label=f"original ({original:.2f})")
        ax.axhline(original - check["threshold"], color="red", lw=0.8, ls=":",
                   label=f"gate (original - {check['threshold']:.4g})")
    else:
        ax.axhline(check["threshold"], color="red", lw=0.8, ls=":",
                   label=f"gate ({check['comparison']} {check['threshold']:.4g})")
    ax.set_xlabel(OBJECTIVE_LABELS.get(objective, objective))
    ax.set_ylabel(metric or check["name"])
    ax.set_title("edgekit search: every trial (marker area = model size)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.partial.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True
