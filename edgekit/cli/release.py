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
    """Bundle a compress run for deployment (`release build RUN_DIR -o DIST`), check one (`release verify DIST`),
    or write a Triton model repository from one (`release triton BUNDLE -o REPO`)."""


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
@click.option("--sign", "sign_key", type=click.Path(dir_okay=False),
              help="Sign manifest.json with this Ed25519 private key (PEM, PKCS8, unencrypted): writes "
                   "manifest.json.sig (raw signature) and manifest.json.sig.json (the key's fingerprint).")
@click.option("--triton", "triton_out", type=click.Path(file_okay=False),
              help="Also write a Triton Inference Server model repository of the bundle to this folder "
                   "(as `edgekit release triton`, with its defaults).")
@json_option
def build(run_dir, output, name, include_fp32, source, bench_reports, allow_failed, overwrite, sign_key, triton_out,
          json_out):
    """Write DIST/<name>/ (models, tokenizer, manifest.json, MODEL_CARD.md) and a deterministic DIST/<name>.tar.gz."""
    from edgekit.release.bundle import ReleaseConfig, release as run_release

    cfg = ReleaseConfig(name=name, include_fp32=include_fp32, source=source, bench_reports=list(bench_reports),
                        allow_failed=allow_failed, sign=sign_key)
    report = run_release(run_dir, output, cfg, overwrite)
    _json(json_out, report.to_dict())
    out = click.get_text_stream("stderr") if json_out == "-" else None
    click.echo(f"Bundle: {report.bundle} ({report.files} files)", file=out)
    click.echo(f"Tarball: {report.tarball} (sha256 {report.tarball_sha256})", file=out)
    if report.signed_by:
        click.echo(f"Signed: manifest.json.sig by Ed25519 key sha256 {report.signed_by}", file=out)
    if triton_out:
        from edgekit.release.triton import triton_repository

        _triton_lines(triton_repository(report.bundle, triton_out, overwrite=overwrite), out)


def _triton_lines(r, out) -> None:
    checked = "parsed with tritonclient's ModelConfig schema" if r.schema_checked else \
        "not parsed: install edgekit-transformers[triton] to check it against Triton's schema"
    click.echo(f"Triton repository: {r.repository} ({', '.join(m['name'] for m in r.models)}; config.pbtxt "
               f"{checked})", file=out)


@release.command("triton")
@click.argument("bundle", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="The model repository folder.")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="max_batch_size of the models.")
@click.option("--max-queue-delay-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Dynamic batching: how long Triton waits for a batch to fill.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (instance_group count).")
@click.option("--kind", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Instance kind (KIND_AUTO, KIND_CPU, KIND_GPU).")
@click.option("--engine", type=click.Path(exists=True, dir_okay=False),
              help="A TensorRT engine built on the target from this bundle's model: adds a tensorrt_plan model.")
@click.option("--overwrite", is_flag=True, help="Replace an existing repository folder.")
@json_option
def triton(bundle, output, max_batch, max_queue_delay_ms, instances, kind, engine, overwrite, json_out):
    """Write a Triton Inference Server model repository from BUNDLE (re-hashed first): config.pbtxt for the
    onnxruntime backend with dynamic batching, the model, and the tokenizer for client-side tokenization."""
    from edgekit.release.triton import TritonConfig, triton_repository

    r = triton_repository(bundle, output, TritonConfig(max_batch, max_queue_delay_ms, instances, kind, engine), overwrite)
    _json(json_out, r.to_dict())
    _triton_lines(r, click.get_text_stream("stderr") if json_out == "-" else None)


def _signature_note(c) -> str:
    s = c.signature
    if not s:
        return ""
    if s["status"] == "valid":
        return f", signature valid (key sha256 {s['public_key_sha256'][:16]}…)"
    return ", signed (signature not checked: pass --public-key)" if s["status"] == "not checked" else ""


@release.command("verify")
@click.argument("path", type=click.Path())
@click.option("--public-key", type=click.Path(dir_okay=False),
              help="Also check the bundle's Ed25519 signature over manifest.json with this public key (PEM); "
                   "an unsigned bundle then fails.")
@json_option
def verify_cmd(path, public_key, json_out):
    """Re-hash a bundle folder, its .tar.gz, or every bundle in DIST (exit 1 on a tampered, missing or extra file,
    or with --public-key a missing or wrong signature)."""
    from edgekit.release.bundle import verify_bundle

    checks = verify_bundle(path, public_key=public_key)
    _json(json_out, {"passed": all(checks), "bundles": [c.to_dict() for c in checks]})
    out = click.get_text_stream("stderr") if json_out == "-" else None
    for c in checks:
        if c.passed:
            click.secho(f"OK: {c.path}: {c.files_checked} files match manifest.json{_signature_note(c)}", fg="green",
                        file=out)
            continue
        click.secho(f"FAILED: {c.path}: {len(c.problems)} problem(s) with manifest.json or its files", fg="red", file=out)
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
    """Regression gate: CURRENT run against --baseline (exit 0 pass, 1 regression or a --require'd check not
    made, 2 bad input). Latency is timed here for both shipped models (--rebench) or shown ungated."""
    from edgekit.cli.common import run_with_progress
    from edgekit.release.gate import regression_gate

    cfg = build_config(RegressionGateConfig, kw)
    report, _ = run_with_progress(json_out, lambda progress: regression_gate(current, baseline, cfg, progress))
    _json(json_out, report.to_dict())
    _ci_warnings(report.warnings, json_out == "-")
    if junit_path:
        report.write_junit(junit_path)
    if markdown_path:
        from edgekit.artifacts import write_text_atomic

        write_text_atomic(markdown_path, report.to_markdown() + "\n")
    _render_gate(report, json_out == "-")
    sys.exit(0 if report.passed else EXIT_CHECK_FAILED)


def _github_escape(text: str) -> str:
    # the workflow-command encoding of a message (actions/toolkit's escapeData): %, CR and LF
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _ci_warnings(warnings: list, to_stderr: bool) -> None:
    """Each warning where the CI shows it: a GitHub Actions annotation (GITHUB_ACTIONS=true), a collapsible
    GitLab job-log section (GITLAB_CI=true); the table below and --markdown/--junit carry them everywhere."""
    import os
    import time

    if not warnings:
        return
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for w in warnings:
            click.echo(f"::warning::{_github_escape(w)}", err=to_stderr)
    if os.environ.get("GITLAB_CI") == "true":
        # GitLab's section markers: ESC[0K section_start:UNIX_TIME:NAME[options] CR ESC[0K header text. The job
        # log is not a terminal, so click would strip the escapes: color=True keeps them (they are the markers).
        t, name = int(time.time()), "edgekit_gate_warnings"
        click.echo(f"\x1b[0Ksection_start:{t}:{name}[collapsed=false]\r\x1b[0K\x1b[33;1medgekit gate: "
                   f"{len(warnings)} warning(s)\x1b[0m", err=to_stderr, color=True)
        for w in warnings:
            click.echo(f"\x1b[33mWarning: {w}\x1b[0m", err=to_stderr, color=True)
        click.echo(f"\x1b[0Ksection_end:{int(time.time())}:{name}\r\x1b[0K", err=to_stderr, color=True)


def _render_gate(report, to_stderr: bool) -> None:
    from rich.console import Console

    from edgekit.reports import to_rich

    # the same sections as --markdown; the warnings are among them, each one unbroken "Warning: ..." line
    Console(stderr=to_stderr, width=output_width()).print(to_rich(report.sections()), crop=False)
