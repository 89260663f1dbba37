import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_and_help_stay_light():
    code = ("import sys, edgekit, edgekit.cli; from click.testing import CliRunner; "
            "r = CliRunner().invoke(edgekit.cli.main, ['--help']); assert r.exit_code == 0; "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'optimum', 'transformers', 'onnx', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version():
    out = subprocess.run([sys.executable, "-m", "edgekit", "--version"], capture_output=True, text=True, check=True).stdout
    assert "edgekit, version" in out


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    # every fence pairs with its own closing fence (a ```text block must not shift the pairing into prose)
    blocks = [body for lang, body in re.findall(r"^```([a-z]*)\n(.*?)^```", text, re.S | re.M)
              if lang in ("", "bash", "sh", "console")]
    cmds = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().lstrip("$ ")
            if line.startswith("edgekit "):
                cmds.append(line.split(" #")[0])
    return cmds


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_commands_parse(command):
    """Every `edgekit ...` example in the README names real commands and options (parsed, not run)."""
    from edgekit.cli import main

    args = shlex.split(command)[1:]
    for stop in (">", ">>", "|", "&&"):  # shell redirections and pipelines are not edgekit's
        args = args[: args.index(stop)] if stop in args else args
    ctx = main.make_context("edgekit", list(args), resilient_parsing=False)
    sub_name, sub, rest = main.resolve_command(ctx, ctx.protected_args + ctx.args)
    sub.make_context(sub_name, rest, parent=ctx)


def test_readme_has_commands():
    assert len(_readme_commands()) >= 6


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = "python -m pytest -q -p no:cacheprovider"
    assert f"&& {command}\n" in readme
    assert f"\n{command}\n" in ci and "pip install -q torch==2.13.0" in ci


@pytest.mark.parametrize("command", ["export", "quantize", "prune", "compress", "engine build"])
def test_output_is_shown_as_required(command, tmp_path):
    """-o is required to run (not to --dump-recipe): the help says so, and leaving it out is a usage error."""
    from click.testing import CliRunner

    from edgekit.cli import main

    words = command.split()
    helptext = CliRunner().invoke(main, [*words, "--help"], terminal_width=200).output
    line = next(l for l in helptext.splitlines() if "--output" in l)
    assert "required" in line, line
    extra = ["--sparsity", "0.3"] if command == "prune" else []
    r = CliRunner().invoke(main, [*words, str(tmp_path), *extra])
    assert r.exit_code == 2 and ("'-o'" in r.output or "--output" in r.output), r.output
