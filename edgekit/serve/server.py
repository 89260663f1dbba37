"""Running the app under uvicorn: one process, or ``--workers N`` processes sharing the socket.

uvicorn (with FastAPI/Starlette) is the ASGI stack: maintained, the one FastAPI documents, and it already does
what a service needs here: TLS (``ssl_keyfile``/``ssl_certfile``), worker processes with a supervisor, and a
graceful shutdown on SIGTERM (the socket is closed at once so new connections are refused, requests in flight
are finished within ``timeout_graceful_shutdown``, then the app's lifespan ends, which drains the batch queue).

The model is opened (and a bundle re-hashed) in the ``edgekit serve`` process first, so that a tampered bundle or
a bad option is one sentence and exit 2 before anything listens; each worker then opens it again (and re-hashes
it: what a worker serves is what it verified).
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import tempfile

from edgekit.errors import EdgekitError
from edgekit.serve.config import ServeConfig

ENV = "EDGEKIT_SERVE"  # the workers' configuration (JSON), set by serve() before uvicorn spawns them


def _threads(cfg: ServeConfig) -> int:
    if cfg.threads:
        return cfg.threads
    return max(1, (os.cpu_count() or 1) // cfg.workers)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(cfg: ServeConfig) -> list[str]:
    """Refusals (EdgekitError) and warnings (returned) about the options, before anything is opened."""
    from pathlib import Path

    if bool(cfg.ssl_keyfile) != bool(cfg.ssl_certfile):
        raise EdgekitError("TLS needs both --ssl-keyfile and --ssl-certfile", "give both files, or neither for plain HTTP")
    for name in ("ssl_keyfile", "ssl_certfile", "api_key_file", "public_key"):
        value = getattr(cfg, name)
        if value and not Path(value).is_file():
            raise EdgekitError(f"--{name.replace('_', '-')} {value} is not a file", "give the path of an existing file")
    warnings = []
    if not is_loopback(cfg.host) and not cfg.api_key_file:
        warnings.append(f"serving on {cfg.host} without --api-key-file: anyone who can reach this address can use "
                        "the model")
    return warnings


def build_app(model_path: str, cfg: ServeConfig):
    from edgekit.serve.app import create_app, read_api_keys
    from edgekit.serve.model import open_served

    keys = read_api_keys(cfg.api_key_file) if cfg.api_key_file else None
    served = open_served(model_path, cfg.variant, _threads(cfg), cfg.public_key)
    return create_app(served, cfg, keys)


def app_from_env():
    """The app factory each worker process calls (``uvicorn edgekit.serve.server:app_from_env --factory``)."""
    from edgekit.cli.common import quiet_libraries

    quiet_libraries()
    spec = json.loads(os.environ[ENV])
    return build_app(spec["model"], ServeConfig(**spec["config"]))


def _uvicorn_options(cfg: ServeConfig) -> dict:
    return dict(host=cfg.host, port=cfg.port, log_level=cfg.log_level, timeout_graceful_shutdown=cfg.graceful_timeout,
                ssl_keyfile=cfg.ssl_keyfile, ssl_certfile=cfg.ssl_certfile, server_header=False,
                proxy_headers=False, lifespan="on")


def serve(model_path: str, cfg: ServeConfig, announce=print) -> None:
    """Open and check the model, then serve until SIGTERM or SIGINT (both: graceful, exit 0)."""
    import importlib.util

    for module in ("uvicorn", "fastapi", "prometheus_client"):
        if importlib.util.find_spec(module) is None:
            from edgekit.errors import MissingExtra

            raise MissingExtra(module, "serve")
    import uvicorn

    app = build_app(model_path, cfg)  # refusals happen here, before anything listens
    served = app.state.served
    scheme = "https" if cfg.ssl_certfile else "http"
    what = (f"bundle {served.name} ({served.files_checked} files match its manifest)" if served.verified
            else f"model {served.folder} (not a release bundle: nothing to verify it against)")
    announce(f"Serving {what}, task {served.task}, on {scheme}://{cfg.host}:{cfg.port} "
             f"({cfg.workers} worker(s), {_threads(cfg)} thread(s) each, batches up to {app.state.batcher.max_batch})")

    # uvicorn installs its own SIGINT/SIGTERM handlers while it runs and re-raises the signal to the previous
    # handler when it has shut down: edgekit's CLI handler (stop now, exit 2) must not be that one.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if cfg.workers == 1:
            server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_options(cfg)))
            try:
                server.run()
            except SystemExit:  # uvicorn exits 1 when it cannot bind (it has logged the OS error)
                pass
            if not server.started:
                raise EdgekitError(f"could not listen on {cfg.host}:{cfg.port}", "choose another --port or --host")
            return
        served.close()  # each worker opens its own
        with tempfile.TemporaryDirectory(prefix="edgekit-metrics-") as metrics_dir:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            os.environ[ENV] = json.dumps({"model": str(model_path), "config": cfg.model_dump()})
            uvicorn.run("edgekit.serve.server:app_from_env", factory=True, workers=cfg.workers, **_uvicorn_options(cfg))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
