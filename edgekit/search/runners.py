"""Where trials run: one local worker process at a time, or Ray actors on a Ray cluster.

Both answer ``run(job) -> result`` and turn a worker that dies (killed by the system for memory, a crash in
native code) into a ``crashed`` result, so the search goes on. A trial always runs in a process of its own,
never in the search's: a trial that runs out of memory must not take the search (and its report) with it.
"""

from __future__ import annotations

import os
import queue
import signal
import threading

from edgekit.errors import EdgekitError, MissingExtra


def _died(exitcode) -> dict:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = f"killed by {name}" + (" (the system's out-of-memory killer sends it)" if name == "SIGKILL" else "")
    else:
        why = f"exited with code {exitcode}"
    return {"state": "crashed", "error": f"the trial's worker process died: {why}"}


def _quiet() -> None:
    """Library chatter off in a worker, as the command line has it off in its own process (a spawned worker
    starts with Python's defaults); what libraries print (onnxruntime's calibrator prints its histogram bins)
    goes nowhere: the search's own lines are the parent's."""
    import sys

    from edgekit.cli.common import quiet_libraries

    quiet_libraries()
    sys.stdout = open(os.devnull, "w")


def _serve(conn, quiet: bool) -> None:
    """The local worker: trials one after another until told to stop (a None job)."""
    # The search owns Ctrl-C: a first Ctrl-C lets the running trial finish, so the worker ignores it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if quiet:
        _quiet()
    from edgekit.search.trial import run_trial

    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(run_trial(job))


class LocalRunner:
    """One spawned worker process, kept between trials (imports paid once), started again after a crash."""

    workers = 1

    def __init__(self, threads: int, quiet: bool = True):
        self.threads, self.quiet = threads, quiet
        self._proc = self._conn = None

    def _start(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self.quiet), name="edgekit-search-trial")
        self._proc.start()
        child.close()

    def run(self, job: dict) -> dict:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        self._conn.send(job)
        while True:  # blocks in poll (no spinning) and notices a worker that died without answering
            try:
                if self._conn.poll(0.5):
                    return self._conn.recv()
            except (EOFError, OSError):
                pass
            if not self._proc.is_alive():
                self._proc.join()
                result = _died(self._proc.exitcode)
                self._proc = None
                return result

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(2)
        self._proc = None


class TrialActor:
    """A Ray actor that runs trials on its own cores.

    Ray reserves CPUs by count and does not pin processes, so two actors on one node could time on the same
    cores. Each actor therefore claims one slot of ``threads`` cores on its node with an exclusive file lock
    (held while it lives, released by the kernel if it dies) and pins itself and the benchmark processes it
    spawns to those cores: two trials never time on the same cores.
    """

    SLOTS = "/tmp/edgekit-ray-slots"

    def __init__(self, threads: int, quiet: bool = True):
        import fcntl

        if quiet:
            _quiet()
        os.makedirs(self.SLOTS, exist_ok=True)
        cores = sorted(os.sched_getaffinity(0))
        self.cores, self._lock = None, None
        for k in range(max(1, len(cores) // threads)):
            f = open(os.path.join(self.SLOTS, f"slot-{threads}-{k}.lock"), "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            self._lock, self.cores = f, cores[k * threads:(k + 1) * threads]
            break
        if self.cores is None:
            raise RuntimeError(f"no free slot of {threads} cores on this node ({len(cores)} cores)")

    def run(self, job: dict) -> dict:
        from edgekit.search.trial import run_trial

        return run_trial({**job, "cores": self.cores})


class RayRunner:
    """Trials as calls on a pool of Ray actors, one trial per actor at a time (``workers`` in flight)."""

    def __init__(self, address: str, threads: int, workers: int | None = None, quiet: bool = True):
        try:
            import ray
        except ImportError:
            raise MissingExtra("ray", "ray") from None
        self.ray, self.threads, self.quiet = ray, threads, quiet
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise EdgekitError(f"no Ray cluster answers at {address} ({str(e).splitlines()[0][:160]})",
                               "start one with `ray start --head` and pass its address, or drop --ray-address") from None
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < threads:
            raise EdgekitError(f"the Ray cluster at {address} has {cpus} CPUs, fewer than --threads {threads}",
                               "lower --threads or add nodes")
        self.workers = workers or max(1, cpus // threads)
        self._actor = ray.remote(num_cpus=threads)(TrialActor)
        self._free: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        for _ in range(self.workers):
            self._free.put(self._actor.remote(threads, quiet))

    def run(self, job: dict) -> dict:
        actor = self._free.get()
        try:
            return self.ray.get(actor.run.remote(job))
        except self.ray.exceptions.RayActorError as e:
            self.ray.kill(actor, no_restart=True)
            actor = self._actor.remote(self.threads, self.quiet)
            return {"state": "crashed", "error": f"the trial's Ray actor died ({str(e).splitlines()[0][:300]})"}
        except self.ray.exceptions.RayTaskError as e:  # a bug in the trial code itself, raised in the actor
            return {"state": "crashed", "error": str(e).splitlines()[-1][:2000]}
        finally:
            self._free.put(actor)

    def close(self) -> None:
        while not self._free.empty():
            self.ray.kill(self._free.get_nowait(), no_restart=True)
        self.ray.shutdown()


def make_runner(ray_address: str | None, threads: int, workers: int | None, quiet: bool = True):
    if ray_address:
        return RayRunner(ray_address, threads, workers, quiet)
    if workers and workers > 1:
        raise EdgekitError("--workers runs trials in parallel on a Ray cluster only",
                           "pass --ray-address (or `auto`), or drop --workers: locally trials run one at a time")
    return LocalRunner(threads, quiet)
