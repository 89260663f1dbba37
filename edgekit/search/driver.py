"""``edgekit search``: Optuna proposes recipes, each runs through the real stages in a worker (trial.py), the
gate decides which pass, and the fastest passing one is written as a normal run folder with its recipe.

The study has two objectives, both minimised: the chosen objective (latency as a ratio to the original's FP32
export timed in the same interleaved run, size, memory, or time per output token) and the accuracy loss of the
gate's first check; passing the gate is an Optuna constraint (feasible when every check is met), so the
multi-objective sampler learns from failing trials too, and the feasible trials nobody beats form the Pareto
front. Optuna's ``study.optimize`` drives it (``n_jobs`` threads when trials run on Ray): its GridSampler,
timeouts and stop() work as documented instead of a loop of our own.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import threading
import time
from pathlib import Path

from edgekit.errors import EdgekitError, MissingExtra
from edgekit.progress import Progress
from edgekit.search.config import SearchConfig
from edgekit.search.report import TrialLog, TRIALS
from edgekit.search.space import NONE, Space, build_space, describe_point, parse_overrides, recipe_key, recipe_of

DEFAULT_TRIALS = 20
DUPLICATE_LIMIT = 50  # proposals of already-tried recipes in a row: the space is used up


class TrialCrashed(Exception):
    """A trial ended without a verdict (its worker died or a stage raised): Optuna records it as failed."""


def objectives(record: dict, objective: str) -> tuple[list[float], float] | None:
    """([objective, accuracy loss], constraint) of a finished trial: lower is better on both, and the gate
    passes when the constraint is <= 0 (the largest violation among the gate's checks)."""
    m, checks = record.get("metrics") or {}, (record.get("verify") or {}).get("checks") or []
    if not checks:
        return None
    value = {"latency": m.get("latency_ratio", m.get("ttft_ratio")), "tokens-per-s": m.get("tpot_ratio"),
             "size": m["size_bytes"] / 2**20 if "size_bytes" in m else None,
             "memory": m["rss_peak_bytes"] / 2**20 if "rss_peak_bytes" in m else None}[objective]
    if value is None:
        return None
    first = checks[0]
    loss = first["value"] if first["comparison"] == "<=" else -first["value"]
    violation = max((c["value"] - c["threshold"]) if c["comparison"] == "<=" else (c["threshold"] - c["value"])
                    for c in checks)
    return [float(value), float(loss)], float(violation)


def _sampler(strategy: str, space: Space, seed: int):
    import optuna

    if strategy == "grid":
        return optuna.samplers.GridSampler({d.key: list(d.choices) for d in space.dimensions}, seed=seed)
    if strategy == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if strategy == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # group=True: the conditional dimensions (static-only options, distillation when pruned) are modelled
    # jointly with the choices they depend on
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=5)


def suggest(trial, space: Space, grid: bool) -> dict:
    """The point of a trial: each dimension whose condition holds, in the table's order. The grid sampler
    needs every dimension suggested; the ones that do not apply are dropped from the point afterwards."""
    point = {}
    for d in space.dimensions:
        if grid or d.when(point):
            point[d.key] = _suggest(trial, d, grid)
    if grid:
        applies = {}
        for d in space.dimensions:
            if d.when(applies):
                applies[d.key] = point[d.key]
        point = applies
    return point


def _suggest(trial, d, grid: bool):
    if d.numeric is None or grid:
        return trial.suggest_categorical(d.key, list(d.choices))
    low, high, step = d.numeric
    if isinstance(step, int):
        v = trial.suggest_int(d.key, low, high, step=step)
    else:  # rounded: low + k * step is not exact in binary floating point
        v = round(trial.suggest_float(d.key, low, high, step=step), 6)
    return NONE if v == 0 else v


def optuna_params(space: Space, point: dict) -> dict:
    """A point as Optuna's parameters (a numeric dimension's NONE is its 0), for enqueue_trial."""
    numeric = {d.key for d in space.dimensions if d.numeric is not None}
    return {k: (0 if v == NONE else v) if k in numeric else v for k, v in point.items()}


DEFAULTS = {"prune.sparsity": NONE, "prune.layers": NONE, "prune.recover_steps": 0, "quantize.mode": "dynamic",
            "quantize.per_channel": True, "quantize.optimize": True, "quantize.exclude_op_types": NONE,
            "quantize.bits": 4, "quantize.block_size": 32, "quantize.lm_head": "8", "quantize.embeddings": "4",
            "quantize.method": "rtn"}
# Where a search starts, before the sampler has anything to learn from: the recipe compress runs by default,
# then the ones a person tries first (per-tensor scales; half the FLOPs pruned; a layer fewer). Each is tried
# only when the space holds it.
STARTS = ({}, {"quantize.per_channel": False}, {"prune.sparsity": 0.5}, {"prune.sparsity": 0.4, "prune.layers": 1})


def start_points(space: Space) -> list[dict]:
    """The starting points the space holds, in order, the first being the recipe ``compress`` would run (so
    that even a one-trial search answers the usual question)."""
    out = []
    for change in STARTS:
        want, point = {**DEFAULTS, **change}, {}
        for d in space.dimensions:
            if not d.when(point):
                continue
            if want.get(d.key, d.choices[0]) not in d.choices:
                if d.key in change:
                    break  # this start is not in the space
                point[d.key] = d.choices[0]
            else:
                point[d.key] = want.get(d.key, d.choices[0])
        else:
            if point not in out:
                out.append(point)
    return out


def file_key(path) -> str | None:
    from edgekit.artifacts import sha256_file

    return sha256_file(Path(path))[:16] if path else None


def trial_bench(base, threads: int, task: str, decoder: bool, context: int | None) -> dict | None:
    """The benchmark every trial runs, as compress would: the evaluation data's real lengths when no length is
    set; a decoder's new tokens capped at half a short context."""
    if base.bench is None:
        return None
    b = base.bench.replace(threads=threads, task=task)
    if b.data is None and b.seq_len is None:
        b = b.replace(data=base.verify.data, text_column=base.verify.text_column)
    if decoder and context and b.new_tokens > context // 2:
        b = b.replace(new_tokens=context // 2)
    return b.to_dict()


class Search:
    """One search's state: the study, the runner, the trial log; ``run()`` drives Optuna."""

    def __init__(self, checkpoint, out: Path, cfg: SearchConfig, base, *, space: Space, decoder: bool,
                 identity: dict, threads: int, runner, previous: list[dict], stop: threading.Event,
                 on_trial=None, progress: Progress | None = None, trust_remote_code: bool = False,
                 context: int | None = None):
        self.checkpoint, self.out, self.cfg, self.base, self.space = str(checkpoint), out, cfg, base, space
        self.decoder, self.identity, self.threads, self.runner = decoder, identity, threads, runner
        self.objective = cfg.objective or ("tokens-per-s" if decoder else "latency")
        self.log = TrialLog(out / TRIALS)
        self.previous = {r["key"]: {**r, "earlier": True, "reused": False} for r in previous
                         if r.get("state") in ("passed", "failed")}
        # the search's trials: an earlier run's finished ones (marked reused when proposed again) and this run's
        self.records: list[dict] = list(self.previous.values())
        self.seen: dict[str, dict] = {}  # this run's keys -> record (a repeated proposal is answered at once)
        self.next_number = 1 + max((r["number"] for r in previous), default=0)
        self.stop, self.on_trial, self.progress = stop, on_trial, progress or Progress()
        self.trust_remote_code = trust_remote_code
        self.bench = trial_bench(base, self.threads, identity["task"], decoder, context)
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.budget = cfg.budget_seconds
        self.max_trials = cfg.max_trials or (None if self.budget else DEFAULT_TRIALS)
        self.reserved = 0  # distinct recipes started in this run (reused ones included)
        self.duplicates = 0
        self.durations: list[float] = []
        self.reason = "complete"
        self.computed = 0  # trials run (not answered from an earlier run) in this run

    # -- one trial ---------------------------------------------------------------------------------------

    def _job(self, recipe, key: str) -> dict:
        b = self.base
        culprit_data = b.quantize.calibration_data or b.verify.data
        return {"checkpoint": self.checkpoint, "checkpoint_key": self.identity["checkpoint_sha256"][:16],
                "recipe": recipe.to_recipe(), "key": key, "cache": str(self.out / "cache"), "threads": self.threads,
                "calibration_key": self.identity.get("calibration_sha256"), "data_key": self.identity["data_sha256"],
                "decoder": self.decoder, "trust_remote_code": self.trust_remote_code,
                "bench": self.bench,
                "culprits": {"max_float": self.cfg.max_float_nodes, "samples": self.cfg.culprit_samples,
                             "data": culprit_data,
                             "data_key": self.identity["calibration_sha256"] or self.identity["data_sha256"],
                             "text_column": b.quantize.text_column or b.verify.text_column}}

    def _reserve(self, key: str) -> bool:
        """Count a new distinct recipe against --max-trials (False once the count is spent)."""
        with self.lock:
            if key in self.seen:
                return True
            if self.max_trials is not None and self.reserved >= self.max_trials:
                return False
            self.reserved += 1
            self.seen[key] = {}
            return True

    def objective_fn(self, trial):
        import optuna

        point = suggest(trial, self.space, self.cfg.strategy == "grid")
        recipe = recipe_of(self.base, self.space, point)
        key = recipe_key(recipe)
        with self.lock:
            repeated = self.seen.get(key)
        if repeated:  # proposed again in this run: the same answer, nothing run, nothing logged
            self.duplicates += 1
            return self._tell(trial, repeated)
        if not self._reserve(key):
            raise optuna.TrialPruned("the trial budget is spent")
        self.duplicates = 0
        if key in self.previous:
            record = self.previous[key]
            record["reused"] = True
        else:
            with self.lock:
                number = self.next_number
                self.next_number += 1
            self.progress.log(f"trial {number}: {describe_point(point)}")
            result = self.runner.run(self._job(recipe, key))
            record = self._record(number, key, point, recipe, result)
            self.log.append(record)
            self.durations.append(record.get("seconds") or 0.0)
            self.computed += 1
        with self.lock:
            self.seen[key] = record
            if not record["reused"]:
                self.records.append(record)
        if self.on_trial:
            self.on_trial(record, self.best())
        return self._tell(trial, record)

    def _tell(self, trial, record: dict):
        if record.get("state") not in ("passed", "failed") or not record.get("objectives"):
            raise TrialCrashed(record.get("error") or "no verdict")
        trial.set_constraint("gate", record["constraint"])
        return record["objectives"]

    def _record(self, number: int, key: str, point: dict, recipe, result: dict) -> dict:
        from edgekit.benchmarks.environment import COMPARED_KEYS

        rec = {"number": number, "key": key, "params": point, "description": describe_point(point),
               "recipe": result.get("recipe") or recipe.to_recipe(), "reused": False,
               "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **result}
        env = result.get("environment") or {}
        rec["environment_key"] = hashlib.sha256(json.dumps({k: env.get(k) for k in COMPARED_KEYS}, sort_keys=True,
                                                           default=str).encode()).hexdigest()[:12]
        scored = objectives(rec, self.objective) if rec.get("state") in ("passed", "failed") else None
        if scored is None and rec.get("state") in ("passed", "failed"):
            rec["state"], rec["error"] = "crashed", "the trial ended without the figures its objective needs"
        if scored is not None:
            rec["objectives"], rec["constraint"] = scored
        return rec

    # -- the loop ------------------------------------------------------------------------------------------

    def best(self) -> dict | None:
        """The passing trial with the lowest objective. A measured objective (latency, memory, tokens/s) is
        compared only among trials of one environment block: the one most trials ran on (with Ray, machines
        may differ; the finalists of every block are re-timed together at the end)."""
        passing = [r for r in self.records if r.get("state") == "passed" and r.get("objectives")]
        if self.objective != "size" and passing:
            blocks = [r.get("environment_key") for r in passing]
            common = max(set(blocks), key=blocks.count)
            passing = [r for r in passing if r.get("environment_key") == common]
        return min(passing, key=lambda r: (r["objectives"][0], r["objectives"][1]), default=None)

    def _callback(self, study, frozen) -> None:
        if self.stop.is_set():
            self.reason = "interrupted"
            study.stop()
        elif self.max_trials is not None and self.reserved >= self.max_trials:
            study.stop()
        elif self.duplicates >= DUPLICATE_LIMIT:
            self.reason = "exhausted"
            study.stop()
        elif self.budget is not None:
            typical = sorted(self.durations)[len(self.durations) // 2] if self.durations else 0.0
            if time.monotonic() - self.started + typical > self.budget:
                self.reason = "budget"
                study.stop()

    def run(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.create_study(directions=["minimize", "minimize"],
                                    sampler=_sampler(self.cfg.strategy, self.space, self.cfg.seed))
        if self.cfg.strategy != "grid":
            for point in start_points(self.space):
                study.enqueue_trial(optuna_params(self.space, point))
        study.optimize(self.objective_fn, n_jobs=getattr(self.runner, "workers", 1), catch=(TrialCrashed,),
                       callbacks=[self._callback], gc_after_trial=False, show_progress_bar=False)
        if self.cfg.strategy == "grid" and self.reason == "complete" and (
                self.max_trials is None or self.reserved < self.max_trials):
            self.reason = "exhausted"
        return study


def check_space(space: Space, decoder: bool, objective: str | None) -> None:
    if objective == "tokens-per-s" and not decoder:
        raise EdgekitError("--objective tokens-per-s is for text-generation models",
                           "use latency, size or memory for this encoder")
    if not space.dimensions:
        raise EdgekitError("the search space is empty", "drop the --space options that leave nothing to choose")


def open_space(cfg: SearchConfig, base, ckpt, decoder: bool) -> Space:
    """The space for this checkpoint: pruning only for the families the prune table knows, and with
    calibration text; whole-layer removal never down to zero layers."""
    calibration = bool(base.quantize.calibration_data or (base.prune and base.prune.calibration_data))
    layers, prunable = None, False
    if not decoder:
        from edgekit.compress.prune_arch import ARCHS

        arch = ARCHS.get(ckpt.model_type)
        prunable = arch is not None  # other families: quantization is searched alone
        layers = int(ckpt.config.get(arch.n_layers) or 0) or None if arch else None
    return build_space(decoder, calibration, parse_overrides(cfg.space), layers, prunable)


def missing_extras() -> None:
    try:
        import optuna  # noqa: F401 - present or not, nothing else
    except ImportError:
        raise MissingExtra("optuna", "search") from None
