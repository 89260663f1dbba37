"""What the benchmark scripts share: the cache folder and the options every script takes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def cache_root() -> Path:
    """Where scripts keep trained models and exports between runs ($EDGEKIT_CACHE, else ~/.cache/edgekit)."""
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def add_common_args(ap: argparse.ArgumentParser, work: str) -> None:
    """--threads (default: every usable core) and --work (default: a folder of the cache)."""
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", type=Path, default=cache_root() / work)
