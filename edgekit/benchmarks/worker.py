"""One benchmark variant in its own process, driven over a pipe by the parent.

Each variant lives in its own process so that its peak RSS is its own (not torch's plus onnxruntime's), and
the parent interleaves short rounds across the processes so that drift (thermal, noisy neighbours) hits every
variant alike. The parent blocks on the pipe while a child runs; idle children block on their pipe too.
"""

from __future__ import annotations

import resource
import sys
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize()


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


def serve(conn, artifact: str, runtime: str | None, threads: int | None, task: str | None, device: str) -> None:
    """Child main loop. Messages: ("inputs", list) / ("run", start, n) / ("stop",)."""
    try:
        baseline = rss_bytes()
        t0 = time.perf_counter()
        from edgekit.runtimes.base import load

        session = load(artifact, device=device, threads=threads, task=task, runtime=runtime)
        conn.send(("ready", {"name": session.name, "load_seconds": time.perf_counter() - t0, "rss_baseline": baseline,
                             "input_names": session.input_names}))
        inputs = []
        while True:
            msg = conn.recv()
            if msg[0] == "inputs":
                inputs = msg[1]
                conn.send(("ok",))
            elif msg[0] == "run":
                _, start, n = msg
                times, phases = [], []
                timed = getattr(session, "timed_run", None)  # GPU sessions: H2D / compute / D2H apart
                for k in range(start, start + n):
                    batch = inputs[k % len(inputs)]
                    t = time.perf_counter_ns()
                    if timed is None:
                        session.run(batch)
                    else:
                        phases.append(timed(batch))
                    times.append(time.perf_counter_ns() - t)
                conn.send(("times", times, phases))
            elif msg[0] == "stop":
                end = {"rss_peak": peak_rss_bytes(), "rss_end": rss_bytes()}
                if session.device != "cpu":
                    from edgekit.benchmarks.gpu import session_device_report

                    end.update(session_device_report(session))
                conn.send(("stopped", end))
                return
    except BaseException as e:  # report, never hang the parent
        from edgekit.errors import EdgekitError

        conn.send(("error", str(e) if isinstance(e, EdgekitError) else f"{type(e).__name__}: {e}",
                   isinstance(e, EdgekitError)))
