"""Shared test helpers (imported by test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from edgekit.cli import main


def run_cli(*args, expect: int | None = 0):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}, wanted {expect}:\n{result.output}"
    return result


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, one sentence on one line, no traceback, naming what is wrong."""
    assert result.exit_code == 2, result.output
    out = result.output
    assert "Traceback" not in out
    error_lines = [line for line in out.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, out
    line = error_lines[0]
    assert line.endswith("."), line
    for f in fragments:
        assert f in line, f"{f!r} not in {line!r}"
    return line


def damaged_copy(src: Path, dst: Path, scale: float = 5.0, seed: int = 0,
                 auto_class: str = "AutoModelForSequenceClassification", blocks=(".encoder.",)) -> Path:
    """A copy of a checkpoint whose weight matrices under ``blocks`` (the encoder by default) are perturbed:
    it must fail the accuracy gate."""
    import torch
    import transformers

    shutil.copytree(src, dst)
    model = getattr(transformers, auto_class).from_pretrained(dst)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(b in name for b in blocks) and p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * p.std() * scale)
    model.save_pretrained(dst)
    return dst


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
