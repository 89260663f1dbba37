"""``search()``: check the inputs, open (or resume) the search folder, run the study, then choose and write.

OUT/trials.jsonl   every finished trial (recipe, verdict, metrics, culprits, environment), appended as it ends
OUT/search.json    the SearchReport (state: running while it runs; complete, budget, exhausted or interrupted)
OUT/report.md      the same for people, with the Pareto plot OUT/pareto.png
OUT/recipe.yaml    the winner's recipe (``edgekit compress CKPT -o RUN --recipe OUT/recipe.yaml`` reproduces it)
OUT/best/          the winner as a normal ``compress`` run folder (release it with ``edgekit release build``)
OUT/cache/         the stage artifacts the trials share (pruned checkpoints, exports, quantized models)
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.progress import Progress
from edgekit.search.config import SearchConfig
from edgekit.search.driver import Search, check_space, file_key, missing_extras, open_space
from edgekit.search.report import (BEST_RECIPE, BEST_RUN, PARETO_PNG, REPORT_JSON, REPORT_MD, TRIALS, SearchReport,
                                   TrialLog, pareto_numbers, plot_pareto)
from edgekit.search.space import recipe_key

IDENTITY_KEYS = ("checkpoint_sha256", "data_sha256", "calibration_sha256", "task", "verify", "gate", "bench", "threads")


def _identity(ckpt, base, threads: int) -> dict:
    from edgekit.artifacts import tree_sha256

    return {"checkpoint_sha256": tree_sha256(ckpt.origin)[0], "data_sha256": file_key(base.verify.data),
            "calibration_sha256": file_key(base.quantize.calibration_data), "task": ckpt.task.name,
            "verify": base.verify.to_section(), "gate": base.gate.to_section(),
            "bench": base.bench.to_section() if base.bench is not None else None, "threads": threads}


def _check_data(ckpt, base) -> None:
    """Bad evaluation or calibration data is one sentence before any trial starts, not N crashed trials."""
    from edgekit.tasks import is_decoder

    if is_decoder(ckpt.task):
        from edgekit import lm_eval

        lm_eval.read_documents(base.verify.data, base.verify.text_column, None, flag="--data")
        if base.quantize.calibration_data:
            lm_eval.read_documents(base.quantize.calibration_data, base.quantize.text_column, None,
                                   flag="--calibration-data")
        return
    from edgekit.data import load_examples

    load_examples(base.verify.data, ckpt.task, base.verify.text_column, base.verify.label_column, ckpt.id2label,
                  base.verify.limit, base.verify.tsv_quoting)
    if base.quantize.calibration_data:
        load_examples(base.quantize.calibration_data, ckpt.task, base.quantize.text_column or base.verify.text_column,
                      limit=8, use_labels=False, flag="--calibration-data")


def _open_output(out: Path, resume: bool, overwrite: bool, protect: tuple, identity: dict) -> tuple[list, dict | None]:
    """The folder to search in: the trials an earlier run of the same search finished and its report
    (``resume``), or none."""
    from edgekit.artifacts import check_write_path

    out = check_write_path(out, protect, "output folder")
    if resume:
        report = out / REPORT_JSON
        if not report.is_file():
            raise EdgekitError(f"{out} holds no search to resume (no {REPORT_JSON})",
                               "give the folder an earlier `edgekit search` wrote, or start a new search with -o")
        previous = json.loads(report.read_text(encoding="utf-8"))
        earlier = previous.get("config", {}).get("identity", {})
        differs = [k for k in IDENTITY_KEYS if earlier.get(k) != identity.get(k)]
        if differs:
            raise EdgekitError(f"the search in {out} was made with other inputs ({', '.join(differs)} differ), so its "
                               "trials would not compare", "start a new search with another -o folder")
        return TrialLog(out / TRIALS).read(), previous
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise EdgekitError(f"the output folder {out} exists and is not empty",
                               "pass --overwrite to replace it, --resume to continue the search in it, or choose "
                               "another folder")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return [], None


def search(checkpoint, output, config: SearchConfig | None = None, base=None, *, resume: bool = False,
           overwrite: bool = False, progress: Progress | None = None, on_trial=None,
           stop: threading.Event | None = None, trust_remote_code: bool = False,
           library_logs: bool = False) -> SearchReport:
    """Explore recipes for ``checkpoint`` and write the fastest one that passes the gate (see the module doc).

    ``base`` is the CompressConfig every trial starts from (evaluation data, gates, calibration text,
    threads, benchmark settings); ``config`` says how to search. ``stop`` (a threading.Event) ends the search
    after the running trial (the CLI sets it on Ctrl-C). ``on_trial(record, best)`` is called after each trial.
    ``library_logs``: let the trial workers print the libraries' warnings and logs (the CLI's --debug).
    """
    from edgekit.benchmarks.environment import environment, usable_cores
    from edgekit.checkpoint import open_checkpoint
    from edgekit.pipeline import CompressConfig
    from edgekit.search.runners import make_runner
    from edgekit.tasks import is_decoder, max_positions

    cfg = config or SearchConfig()
    missing_extras()
    progress, stop = progress or Progress(), stop or threading.Event()
    base = (base or CompressConfig()).resolved(Path(checkpoint).resolve())
    if not base.verify.data:
        raise EdgekitError("search needs evaluation data to gate every trial", "pass --data FILE")
    if base.bench is None and cfg.objective != "size":
        raise EdgekitError(f"--no-bench leaves the {cfg.objective or 'latency'} objective nothing to measure",
                           "use --objective size with --no-bench, or time the trials")
    ckpt = open_checkpoint(checkpoint, base.task, trust_remote_code, base.base)
    decoder = is_decoder(ckpt.task)
    # What a recipe leaves to the machine is decided once, here, as compress does, so that every trial's
    # recipe (and the winner's recipe.yaml) says what was run
    from edgekit.compress.quantize import default_reduce_range

    threads = base.threads or usable_cores()
    reduce_range = base.quantize.reduce_range if base.quantize.reduce_range is not None else default_reduce_range()
    base = base.model_copy(update={"threads": threads,
                                   "quantize": base.quantize.replace(reduce_range=reduce_range)})
    space = open_space(cfg, base, ckpt, decoder)
    check_space(space, decoder, cfg.objective)
    _check_data(ckpt, base)
    identity = _identity(ckpt, base, threads)
    out = Path(output).resolve()
    inputs = tuple(Path(p) for p in (ckpt.path, ckpt.origin, base.verify.data, base.quantize.calibration_data) if p)
    t0 = time.perf_counter()
    runner = make_runner(cfg.ray_address, threads, cfg.workers, quiet=not library_logs)  # refusals before OUT exists
    try:
        previous, earlier = _open_output(out, resume, overwrite, inputs, identity)
    except BaseException:
        runner.close()
        raise
    s = Search(ckpt.origin, out, cfg, base, space=space, decoder=decoder, identity=identity, threads=threads,
               runner=runner, previous=previous, stop=stop, on_trial=on_trial, progress=progress,
               trust_remote_code=trust_remote_code, context=max_positions(ckpt.config))
    config_record = {"search": cfg.to_dict(), "base_recipe": base.to_recipe(), "identity": identity,
                     "runner": "ray" if cfg.ray_address else "local", "workers": getattr(runner, "workers", 1)}

    def report(state: str, **extra) -> SearchReport:
        return _report(s, ckpt, out, state, config_record, space, environment(threads), time.perf_counter() - t0, **extra)

    _write(report("running"), out)
    try:
        s.run()
    finally:
        runner.close()
    best = s.best()
    confirmation = None
    if best is not None and s.reason != "interrupted":
        best, confirmation = _confirm(s, best, progress, earlier)
    final = report(s.reason, best=best, confirmation=confirmation)
    if best is not None:
        from edgekit.recipe import dump_recipe

        from edgekit.artifacts import write_text_atomic

        winner = CompressConfig.model_validate(best["recipe"])
        write_text_atomic(out / BEST_RECIPE, dump_recipe(winner, relative_to=out))
        if s.reason != "interrupted":
            final.best_run = _write_best(ckpt, out, winner, best, progress, trust_remote_code)
    _write(final, out)
    return final


def _summary(r: dict) -> dict:
    keep = ("number", "key", "description", "state", "reused", "earlier", "objectives", "constraint", "metrics", "error",
            "environment_key", "seconds", "params")
    out = {k: r.get(k) for k in keep if k in r}
    v = r.get("verify") or {}
    out["verify"] = {"checks": v.get("checks"), "passed": v.get("passed"),
                     "original_metrics": v.get("original_metrics"), "candidate_metrics": v.get("candidate_metrics")}
    c = r.get("culprits") or {}
    out["culprits"] = {"diagnosis": c.get("diagnosis"), "kept_in_float": c.get("kept_in_float") or [],
                       "per_channel": c.get("per_channel") or [], "nodes": (c.get("nodes") or [])[:10]} if c else None
    return out


def _report(s: Search, ckpt, out: Path, state: str, config_record: dict, space, env: dict, seconds: float,
            best: dict | None = None, confirmation: dict | None = None) -> SearchReport:
    trials = [_summary(r) for r in sorted(s.records, key=lambda r: r["number"])]
    best = best if best is not None else s.best()
    b = None
    if best is not None:
        b = {**_summary(best), "recipe": best.get("recipe"), "culprits": best.get("culprits"),
             "verify": best.get("verify"), "attempts": best.get("attempts"), "artifacts": best.get("artifacts")}
    notes = list(space.notes)
    envs = {t.get("environment_key") for t in trials if t.get("environment_key")}
    if len(envs) > 1:
        notes.append(f"trials ran on {len(envs)} different machines: latency is compared only among trials of one "
                     "environment block, and the finalists were re-timed together on this machine")
    return SearchReport(source=str(ckpt.origin), output=str(out), task=ckpt.task.name, state=state,
                        objective=s.objective, strategy=s.cfg.strategy, passed=b is not None, best=b, trials=trials,
                        pareto=pareto_numbers(trials), confirmation=confirmation, space=space.describe(),
                        config=config_record, environment=env, seconds=seconds, notes=notes)


def _write(report: SearchReport, out: Path) -> None:
    from edgekit.artifacts import write_text_atomic

    write_text_atomic(out / REPORT_JSON, report.to_json() + "\n")
    d = report.to_dict()
    if report.state != "running":
        best = (d.get("best") or {}).get("number")
        plot_pareto(d["trials"], d["pareto"], best, d["objective"], out / PARETO_PNG)
    md = report.to_markdown()
    if (out / PARETO_PNG).is_file():
        md += f"\n\n![accuracy against {d['objective']}]({PARETO_PNG})\n"
    write_text_atomic(out / REPORT_MD, md + "\n")


def _confirm(s: Search, best: dict, progress: Progress, earlier: dict | None = None) -> tuple[dict, dict | None]:
    """The finalists (the best passing trials of each environment block) re-timed in one interleaved run
    on this machine: the winner is chosen from that run, not from figures measured at different times. A
    resumed search that computed nothing new keeps the earlier run's verdict on the same finalists."""
    n = s.cfg.confirm_top
    if n < 2 or s.objective not in ("latency", "tokens-per-s") or s.bench is None:
        return best, None
    passing = sorted((r for r in s.records if r.get("state") == "passed" and r.get("objectives")),
                     key=lambda r: r["objectives"][0])
    finalists, seen = [], set()
    for r in passing:
        if r["key"] not in seen and sum(1 for f in finalists if f["environment_key"] == r["environment_key"]) < n:
            finalists.append(r)
            seen.add(r["key"])
    if len(finalists) < 2:
        return best, None
    before = (earlier or {}).get("confirmation")
    if s.computed == 0 and before and [v["number"] for v in before["variants"]] == [f["number"] for f in finalists]:
        fastest = min(before["variants"], key=lambda v: v["p50_ms"])["number"]
        return next(f for f in finalists if f["number"] == fastest), before
    models = [Path(r["artifacts"]["model"]) for r in finalists]
    if not all(m.is_dir() for m in models) or not Path(finalists[0]["artifacts"].get("reference", "")).is_dir():
        return best, None
    reference = Path(finalists[0]["artifacts"]["reference"])
    from edgekit.benchmarks.bench import BenchConfig

    bcfg = BenchConfig.model_validate(s.bench)
    with progress.step(f"Re-timing the {len(finalists)} finalists interleaved"):
        if s.decoder:
            from edgekit.benchmarks.decode import bench_decoders

            r = bench_decoders([reference, *models], bcfg).to_dict()
            times = [1000.0 / v["decode_tokens_per_s_p50"] for v in r["variants"]]
        else:
            from edgekit.benchmarks.bench import bench

            r = bench([reference, *models], bcfg).to_dict()
            times = [v["latency"]["p50_ms"] for v in r["variants"]]
    variants = [{"number": f["number"], "description": f["description"], "p50_ms": t, "ratio": t / times[0]}
                for f, t in zip(finalists, times[1:])]
    winner = min(zip(finalists, times[1:]), key=lambda x: x[1])[0]
    what = "time per output token" if s.decoder else "p50 latency"
    method = (f"{what} of the finalists and the reference (the original's ONNX FP32 export) in one interleaved "
              f"`bench` run, {s.threads} threads, on this machine; the winner is the fastest here.")
    return winner, {"variants": variants, "reference_p50_ms": times[0], "method": method, "environment": r["environment"]}


def _write_best(ckpt, out: Path, recipe, best: dict, progress: Progress, trust_remote_code: bool) -> str:
    """OUT/best: the winner's recipe run by ``compress``, so the folder is exactly what the recipe makes (a
    resumed search whose winner did not change keeps the folder it already has)."""
    from edgekit.pipeline import compress

    dest = out / BEST_RUN
    done = dest / "report.json"
    if done.is_file():
        try:
            earlier = json.loads(done.read_text(encoding="utf-8"))["config"]["recipe"]
        except (ValueError, KeyError, TypeError):
            earlier = None
        if earlier is not None and recipe_key(earlier) == recipe_key(recipe):
            return str(dest)
    record = {"trial": best["number"], "key": best["key"], "culprits": best.get("culprits"),
              "attempts": best.get("attempts"), "search": str(out)}
    with progress.step(f"Writing the winner (trial {best['number']}) as a run folder"):
        compress(ckpt.origin, dest, recipe, overwrite=True, progress=progress, trust_remote_code=trust_remote_code,
                 search_record=record)
    return str(dest)
