"""The options of ``edgekit serve``, declared once (``edgekit.options``): the CLI and the Python API derive from it."""

from __future__ import annotations

from typing import Literal, Optional

from edgekit.options import StageConfig, option


class ServeConfig(StageConfig):
    host: str = option("127.0.0.1", "Address to bind (loopback by default; another address without "
                       "--api-key-file is warned about).")
    port: int = option(8080, "TCP port to listen on.", between=(1, 65535))
    variant: str = option("int8", "Which model of a bundle to serve (int8, or fp32 when the bundle ships it).")
    max_batch: int = option(16, "Largest dynamic batch, in inputs (1: no batching).", between=(1, 1024))
    max_wait_ms: float = option(5.0, "How long the first queued request waits for others to join its batch, in "
                                "milliseconds.", between=(0, 10000))
    max_queue: int = option(64, "Requests waiting for a batch beyond which new ones get 429 with Retry-After.",
                            between=(1, 100000))
    max_request_bytes: int = option(1 << 20, "Largest request body, in bytes (beyond it: 413).", between=(64, None))
    max_inputs: int = option(64, "Most texts in one request (beyond it: 413).", between=(1, 100000))
    max_tokens: int = option(8192, "Most tokens in one request after truncation, summed over its texts (beyond "
                             "it: 413); each text is truncated to the model's maximum length.", between=(1, None))
    max_new_tokens: int = option(256, "text-generation: the largest max_tokens a completion may ask for (beyond "
                                 "it: 413).", between=(1, None))
    request_timeout: float = option(30.0, "Seconds a request may take, queue wait included (beyond it: 504).",
                                    between=(0, None), gt=0)
    graceful_timeout: float = option(30.0, "On SIGTERM: seconds given to requests in flight before they are cut "
                                     "off (new connections are refused at once).", between=(0, None))
    workers: int = option(1, "Server processes (each loads the model and batches on its own; the threads are "
                          "divided among them).", between=(1, 64))
    threads: Optional[int] = option(None, "onnxruntime threads per worker (default: the cores divided among the "
                                    "workers).", ge=1)
    api_key_file: Optional[str] = option(None, "File with the accepted API keys, one per line: requests must send "
                                         "'Authorization: Bearer KEY' (401 otherwise; /healthz and the page at / "
                                         "are open).", path=True)
    ssl_keyfile: Optional[str] = option(None, "TLS private key (PEM): serve HTTPS (with --ssl-certfile).", path=True)
    ssl_certfile: Optional[str] = option(None, "TLS certificate chain (PEM).", path=True)
    public_key: Optional[str] = option(None, "Also check the bundle's Ed25519 signature with this public key (PEM) "
                                       "before serving.", path=True)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = option(
        "info", "uvicorn's log level (access lines at info).")
