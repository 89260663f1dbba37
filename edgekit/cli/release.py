"""``edgekit release`` and ``edgekit gate``: bundles for deployment, and the regression gate for CI.

``edgekit release build RUN_DIR -o DIST`` bundles a run, ``edgekit release verify DIST`` checks a bundle.
There is no default subcommand: ``edgekit release RUN_DIR`` is refused with the ``build`` spelling, because
a default would make a run folder named ``verify`` mean something else. Only click is imported at module level.
"""

from __future__ import annotations

import shlex
import sys

import click

from edgekit.cli.common import json_option, output_width, write_json as _json
from edgekit.cli.options import build as build_config, config_options
from edgekit.errors import EXIT_CHECK_FAILED
from edgekit.release.gate import RegressionGateConfig


class _ReleaseGroup(click.Group):
    """Refuses ``release RUN_DIR`` (the spelling of older edgekit) naming the command that does it."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            raise click.UsageError(f"'{args[0]}' is not a release subcommand: to bundle the run folder, use "
                                   f"`edgekit release build {shlex.quote(args[0])} -o DIST`.", ctx)
        return super().parse_args(ctx, args)


@click.group(cls=_ReleaseGroup)
def release():
    """Bundle a compress run for deployment (`release build RUN_DIR -o DIST`), or check one (`release verify DIST`)."""


@release.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", required=True, help="DIST folder: gets <name>/ and <name>.tar.gz.")
@click.option("--name", help="Bundle name (default: <source checkpoint folder>-int8).")
@click.option("--include-fp32", is_flag=True, help="Also ship the FP32 ONNX model (fp32/).")
@click.option("--source", type=click.Path(exists=True, file_okay=False),
              help="The source checkpoint, if it moved since compress ran (it is hashed into the manifest).")
@click.option("--bench-report", "bench_reports", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Add an `edgekit bench --json` report from another device (repeatable).")
@click.option("--allow-failed", is_flag=True, help="Bundle a run whose accuracy gate failed (marked failed).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle of the same name.")
@json_option
def build(run_dir, output, name, include_fp32, source, bench_reports, allow_failed, overwrite, json_out):
    """Write DIST/<name>/ (models, tokenizer, manifest.json, MODEL_CARD.md) and a deterministic DIST/<name>.tar.gz."""
    from edgekit.release.bundle import ReleaseConfig, release as run_release

    cfg = ReleaseConfig(name=name, include_fp32=include_fp32, source=source, bench_reports=list(bench_reports),
                        allow_failed=allow_failed)
    report = run_release(run_dir, output, cfg, overwrite)
    _json(json_out, report.to_dict())
    out = click.get_text_stream("stderr") if json_out == "-" else None
    click.echo(f"Bundle: {report.bundle} ({report.files} files)", file=out)
    click.echo(f"Tarball: {report.tarball} (sha256 {report.tarball_sha256})", file=out)


@release.command("verify")
@click.argument("path", type=click.Path())
@json_option
def verify_cmd(path, json_out):
    """Re-hash a bundle folder, its .tar.gz, or every bundle in DIST (exit 1 on a tampered, missing or extra file)."""
    from edgekit.release.bundle import verify_bundle

    checks = verify_bundle(path)
    _json(json_out, {"passed": all(checks), "bundles": [c.to_dict() for c in checks]})
    out = click.get_text_stream("stderr") if json_out == "-" else None
    for c in checks:
        if c.passed:
            click.secho(f"OK: {c.path}: {c.files_checked} files match manifest.json", fg="green", file=out)
            continue
        click.secho(f"FAILED: {c.path}: {len(c.problems)} file(s) do not match manifest.json", fg="red", file=out)
        for p in c.problems:
            click.echo(f"  {p['problem']:<8} {p['file']}  ({p['detail']})", file=out)
    if not all(checks):
        sys.exit(EXIT_CHECK_FAILED)


@click.command()
@click.argument("current", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(),
              help="The run to compare with: a report.json, a release manifest.json, their folder, or a release .tar.gz.")
@config_options(RegressionGateConfig)
@click.option("--junit", "junit_path", type=click.Path(dir_okay=False), help="Write the checks as JUnit XML.")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False),
              help="Write a Markdown summary (for a pull-request comment).")
@json_option
def gate(current, baseline, junit_path, markdown_path, json_out, **kw):
    """Regression gate: CURRENT run against --baseline (exit 0 pass, 1 regression, 2 bad input)."""
    from edgekit.release.gate import regression_gate

    cfg = build_config(RegressionGateConfig, kw)
    report = regression_gate(current, baseline, cfg)
    _json(json_out, report.to_dict())
    if junit_path:
        report.write_junit(junit_path)
    if markdown_path:
        with open(markdown_path, "w", encoding="utf-8") as f:
            f.write(report.to_markdown() + "\n")
    _render_gate(report, json_out == "-")
    sys.exit(0 if report.passed else EXIT_CHECK_FAILED)


def _render_gate(report, to_stderr: bool) -> None:
    from rich.console import Console

    from edgekit.reports import to_rich

    # the same sections as --markdown; the warnings are among them, each one unbroken "Warning: ..." line
    Console(stderr=to_stderr, width=output_width()).print(to_rich(report.sections()), crop=False)
