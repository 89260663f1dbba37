"""One benchmark variant in its own process, driven over a pipe by the parent.

Each variant lives in its own process so that its peak RSS is its own (not torch's plus onnxruntime's), and
the parent interleaves short rounds across the processes so that drift (thermal, noisy neighbours) hits every
variant alike. The parent blocks on the pipe while a child runs; idle children block on their pipe too.

What is timed is the backend's call only: each batch is prepared (``Session.prepare``: the model's inputs,
its dtypes, contiguous arrays, torch tensors) once, when the inputs arrive, and the clock runs around
``run_prepared`` (or a GPU session's ``timed_run_prepared``, which splits H2D / compute / D2H).

Memory is kept apart as optimum-benchmark does: the peak after loading and the first call, and the peak
*increase* during the timed loop (VmHWM reset through /proc/self/clear_refs before it; elsewhere the RSS
sampled after each round, a lower bound).
"""

from __future__ import annotations

import resource
import sys
import time


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize()
    except OSError:  # no procfs (macOS)
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    # VmHWM belongs to this address space; getrusage's ru_maxrss is carried across fork+exec on Linux, so in
    # a spawned child it would report the parent's peak (measured: 391 MiB for a 57 MiB ORT process).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: "5" to clear_refs); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _shape(batch: dict) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))


def _timed(call, phased: bool, prepared: list, indices) -> tuple[list, list]:
    times, phases = [], []
    for k in indices:
        batch = prepared[k % len(prepared)]
        t = time.perf_counter_ns()
        out = call(batch)
        times.append(time.perf_counter_ns() - t)
        if phased:
            phases.append(out)
    return times, phases


class _Memory:
    """RSS peaks: after load + first call, then the increase during the timed loop."""

    def __init__(self):
        self.baseline = rss_bytes()
        self.load_peak = None
        self.before_timing = None  # VmHWM up to the first timed round (load, first call, warm-up)
        self.start = self.sampled = 0
        self.reset = False

    def after_first_call(self) -> None:
        if self.load_peak is None:
            self.load_peak = peak_rss_bytes()

    def timing_starts(self) -> None:
        if self.before_timing is None:
            self.after_first_call()
            self.before_timing = peak_rss_bytes()
            self.reset = reset_peak_rss()
            self.start = self.sampled = rss_bytes()

    def after_round(self) -> None:
        self.sampled = max(self.sampled, rss_bytes())

    def report(self) -> dict:
        self.after_first_call()
        peak = peak_rss_bytes()
        if self.before_timing is None:  # no timed loop
            return {"rss_peak": peak, "rss_load_peak": self.load_peak, "rss_run_peak": None, "rss_run_method": None}
        if self.reset:  # VmHWM now covers the timed loop alone
            return {"rss_peak": max(peak, self.before_timing), "rss_load_peak": self.load_peak,
                    "rss_run_peak": max(peak - self.start, 0), "rss_run_method": "VmHWM reset before the timed loop"}
        return {"rss_peak": peak, "rss_load_peak": self.load_peak, "rss_run_peak": max(self.sampled - self.start, 0),
                "rss_run_method": "RSS sampled after each round (a lower bound)"}


def serve(conn, artifact: str, runtime: str | None, threads: int | None, task: str | None, device: str) -> None:
    """Child main loop. Messages: ("inputs", list) / ("warm", indices) / ("run", start, n) / ("stop",).

    "warm" runs (the first call among them) are untimed as far as the report goes and record the shapes
    they ran; "run" is a round of the timed loop. Both reply ("times", ns per run, GPU phases per run).

    The parent owns interruption: Ctrl-C reaches the whole process group, and a worker that raised
    KeyboardInterrupt mid-round would race the parent's cleanup; so SIGINT is ignored here and the parent
    stops its workers (SIGTERM, or closing the pipe). A parent that went away ends the loop without a word.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # signal handlers are the main thread's only
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _serve(conn, artifact, runtime, threads, task, device)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the parent closed the pipe or exited: nobody is left to report to


def _serve(conn, artifact: str, runtime: str | None, threads: int | None, task: str | None, device: str) -> None:
    try:
        memory = _Memory()
        t0 = time.perf_counter()
        from edgekit.runtimes.base import load

        session = load(artifact, device=device, threads=threads, task=task, runtime=runtime)
        conn.send(("ready", {"name": session.name, "load_seconds": time.perf_counter() - t0,
                             "rss_baseline": memory.baseline, "input_names": session.input_names}))
        prepare = getattr(session, "prepare", None) or (lambda batch: batch)
        # GPU sessions: H2D / compute / D2H apart (timed_run: a session that prepares nothing itself)
        phased = getattr(session, "timed_run_prepared", None) or getattr(session, "timed_run", None)
        call = phased or getattr(session, "run_prepared", None) or session.run
        prepared, shapes, warmed, cold = [], [], set(), 0
        while True:
            msg = conn.recv()
            if msg[0] == "inputs":
                shapes = [_shape(b) for b in msg[1]]
                prepared = [prepare(b) for b in msg[1]]  # before any clock starts
                conn.send(("ok",))
            elif msg[0] == "warm":
                indices = list(msg[1])
                times, phases = _timed(call, phased is not None, prepared, indices)
                warmed.update(shapes[k % len(shapes)] for k in indices)
                memory.after_first_call()
                conn.send(("times", times, phases))
            elif msg[0] == "run":
                _, start, n = msg
                memory.timing_starts()
                indices = range(start, start + n)
                cold += sum(shapes[k % len(shapes)] not in warmed for k in indices)
                times, phases = _timed(call, phased is not None, prepared, indices)
                memory.after_round()
                conn.send(("times", times, phases))
            elif msg[0] == "stop":
                end = {**memory.report(), "rss_end": rss_bytes(), "cold_runs": cold}
                if session.device != "cpu":
                    from edgekit.benchmarks.gpu import session_device_report

                    end.update(session_device_report(session))
                conn.send(("stopped", end))
                return
    except (EOFError, BrokenPipeError, ConnectionResetError):
        raise  # the parent is gone: serve() ends quietly
    except BaseException as e:  # report, never hang the parent
        from edgekit.errors import EdgekitError

        conn.send(("error", str(e) if isinstance(e, EdgekitError) else f"{type(e).__name__}: {e}",
                   isinstance(e, EdgekitError)))
