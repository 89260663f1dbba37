"""The options of ``edgekit search``, declared once (the CLI and the API derive from this config)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import field_validator

from edgekit.options import StageConfig, option

OBJECTIVES = ("latency", "size", "memory", "tokens-per-s")
STRATEGIES = ("tpe", "nsga2", "random", "grid")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text) -> float:
    """'30m', '1h30m', '90s', '900' (seconds) -> seconds; ValueError naming the value otherwise."""
    s = str(text).strip().lower().replace(" ", "")
    pos, total = 0, 0.0
    for m in _DURATION.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not s or pos != len(s) or total <= 0:
        raise ValueError(f"{text!r} is not a duration: write e.g. 30m, 1h30m, 90s or 900 (seconds)")
    return total


class SearchConfig(StageConfig):
    """How the search explores recipes (the recipe's own options, gates and data come from the base recipe)."""

    objective: Optional[Literal["latency", "size", "memory", "tokens-per-s"]] = option(
        None, "What 'fastest' means: p50 latency, model size, peak memory or decode tokens/s (default: latency; "
              "tokens-per-s for text-generation).")
    strategy: Literal["tpe", "nsga2", "random", "grid"] = option(
        "tpe", "Optuna sampler: tpe (multi-objective TPE), nsga2, random, or grid (every combination of the space).")
    max_trials: Optional[int] = option(None, "Stop after this many distinct recipes (default 20 without "
                                       "--time-budget).", ge=1)
    time_budget: Optional[str] = option(None, "Stop starting trials when this much time is spent (30m, 1h, 900s); "
                                        "the best passing variant so far is returned.", metavar="DURATION")
    seed: int = option(0, "Seed of the sampler (the same seed and space replay the same trials).")
    space: list[str] = option(help="Narrow a dimension of the search space: KEY=V1,V2 (e.g. prune.sparsity=0,0.4,0.5 "
                              "or quantize.mode=dynamic); repeatable.", default_factory=list, metavar="KEY=V1,V2")
    max_float_nodes: int = option(
        8, "When a quantized trial misses the gate: mend up to this many of its worst nodes, 1, 2, 4 ... at a "
           "time (per-channel scales first in a dynamic per-tensor trial, then float), until it passes (0: no "
           "culprit search).", ge=0)
    culprit_samples: int = option(64, "Examples the culprit ranking measures each node's damage on.", ge=1)
    confirm_top: int = option(3, "At the end, re-time this many of the best passing trials interleaved in one "
                              "run and choose among them (0 or 1: no re-timing).", ge=0)
    ray_address: Optional[str] = option(None, "Run trials as Ray tasks on this Ray cluster (host:port, or auto); "
                                        "default: locally, one at a time.")
    workers: Optional[int] = option(None, "With --ray-address: trials in flight (default: the cluster's CPUs / "
                                    "--threads).", ge=1)

    @field_validator("time_budget")
    @classmethod
    def _budget(cls, v):
        if v is not None:
            parse_duration(v)
        return v

    @property
    def budget_seconds(self) -> float | None:
        return parse_duration(self.time_budget) if self.time_budget else None
