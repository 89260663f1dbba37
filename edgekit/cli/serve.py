"""``edgekit serve BUNDLE|MODEL``: a verified release bundle (or a model folder) as an HTTP service."""

from __future__ import annotations

import click

from edgekit.cli.options import build as build_config, config_options
from edgekit.serve.config import ServeConfig


@click.command()
@click.argument("model", type=click.Path())
@config_options(ServeConfig)
def serve(model, **kw):
    """Serve MODEL (a release bundle folder or .tar.gz, re-hashed against its manifest first; or an edgekit
    export/quantize folder, served as unverified) over HTTP until SIGTERM or Ctrl-C (both finish the requests in
    flight). Endpoints: /v1/embeddings, /v1/classify, /v1/completions (by task), /v1/models, /healthz, /readyz,
    /metrics and a page to try it at /."""
    from edgekit.serve.server import check, serve as run_serve

    cfg = build_config(ServeConfig, kw)
    for w in check(cfg):
        click.secho(f"Warning: {w}", fg="yellow", err=True)
    run_serve(model, cfg, announce=lambda line: click.echo(line, err=True))
