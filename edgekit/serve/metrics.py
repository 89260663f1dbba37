"""Prometheus metrics of a server, with prometheus_client.

One process: the metrics live in a registry of their own (two apps in one process do not collide). Several
workers (``--workers N``): prometheus_client's multiprocess mode, each worker writing its values to files in
``PROMETHEUS_MULTIPROC_DIR`` (set by ``edgekit serve`` before the workers start) and ``/metrics`` summing them,
so that any worker answers for all of them.
"""

from __future__ import annotations

import os

# Latency buckets (seconds) from 0.5 ms to 30 s: an INT8 MiniLM answers in milliseconds, a completion in seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0, 2.0, 4.0,
                   8.0, 16.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
ENDPOINTS = ("/v1/embeddings", "/v1/classify", "/v1/completions", "/v1/models", "/healthz", "/readyz", "/metrics", "/")


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self, model_labels: dict, bench_latency: dict | None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = None if multiprocess() else CollectorRegistry()
        reg = {"registry": self.registry} if self.registry is not None else {}
        self.requests = Counter("edgekit_requests_total", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], **reg)
        self.duration = Histogram("edgekit_request_duration_seconds", "Time from a request's arrival to its answer "
                                  "(for a stream: to its last event).", ["endpoint"], buckets=LATENCY_BUCKETS, **reg)
        self.queue_wait = Histogram("edgekit_queue_wait_seconds", "Time a request waited in the queue before its "
                                    "batch started.", buckets=LATENCY_BUCKETS, **reg)
        self.compute = Histogram("edgekit_batch_compute_seconds", "Time the model took for one batch (pre-padding to "
                                 "answers).", buckets=LATENCY_BUCKETS, **reg)
        self.batch_size = Histogram("edgekit_batch_size", "Texts per batch run by the model.", buckets=BATCH_BUCKETS,
                                    **reg)
        mode = {"multiprocess_mode": "livesum"} if multiprocess() else {}
        self.queue_depth = Gauge("edgekit_queue_depth", "Requests waiting in the queue.", **mode, **reg)
        self.rejected = Counter("edgekit_rejected_requests_total", "Requests refused before they reached the model, "
                                "by reason.", ["reason"], **reg)
        # Info-style gauges (prometheus_client's Info is not available in multiprocess mode)
        info_mode = {"multiprocess_mode": "max"} if multiprocess() else {}
        labels = sorted(model_labels)
        self.info = Gauge("edgekit_model_info", "The model served, from its release manifest (value 1).", labels,
                          **info_mode, **reg)
        self.info.labels(**model_labels).set(1)
        self.bench = Gauge("edgekit_model_bench_latency_seconds", "The served variant's latency per request in the "
                           "manifest's benchmark, by quantile (for alerts: served p99 against it).", ["quantile"],
                           **info_mode, **reg)
        for q, v in (bench_latency or {}).items():
            self.bench.labels(quantile=q).set(v)
        for reason in ("queue_full", "unauthorized", "too_large", "timeout", "bad_request"):
            self.rejected.labels(reason=reason)  # exported at 0 from the start, so rate() has a series

    def observe(self, kind: str, value: float) -> None:
        if kind == "queue_depth":
            self.queue_depth.set(value)
        elif kind == "queue_wait":
            self.queue_wait.observe(value)
        elif kind == "compute":
            self.compute.observe(value)
        elif kind == "batch_size":
            self.batch_size.observe(value)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.registry is not None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        from prometheus_client import multiprocess as mp

        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def endpoint_label(path: str) -> str:
    """The path as a label, from a fixed set (a scanner's random paths must not become new series)."""
    return path if path in ENDPOINTS else "other"
