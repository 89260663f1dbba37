"""``edgekit bench --device jetson``: on the Jetson itself, or from a dev box over SSH.

On a Jetson the CPU and GPU share one RAM and NVML is absent, so the device figures come from the board:
tegrastats sampled during the timed loop only (peak/mean RAM, GR3D load, *module* power, energy per
inference), NvMapMemUsed from /proc/meminfo (GPU allocations) and the worker's RSS. The nvpmodel mode and
the clocks seen by tegrastats are recorded; clocks are locked (nvpmodel -m, jetson_clocks) only with
--lock-clocks, and restored afterwards (jetson_clocks --store/--restore, the previous nvpmodel mode). Both
tools need root: edgekit runs them directly as root, else through ``sudo -n`` (never a password prompt). A
mode is trusted only once ``nvpmodel -q`` reports it; one that needs a reboot is refused, never rebooted into.

Each variant is timed alone, not interleaved: tegrastats measures the whole module, so power and memory
can only be attributed to a variant that runs by itself.

From a dev box (``--host``) the artifact is copied over SSH and ``edgekit bench --device jetson`` runs on
the device (an ONNX artifact with the tensorrt runtime is built into an engine there, by that bench).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.progress import Progress

TIMING_STEP = "Timing"  # bench() names its timed loop "Timing N variant(s), interleaved"
POWER_LABEL = ("module power (VDD_IN or POM_5V_IN where the module has it, else the sum of the module rails; "
               "never the carrier board)")
_SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=_SBIN)
    if not found:
        raise EdgekitError(f"{name} was not found", "run this on a Jetson with JetPack installed")
    return found


# How the tools say they are not root: jetson_clocks (L4T) "Error: Run this script(...) as a root user",
# nvpmodel and the kernel "Permission denied" / "Operation not permitted".
_NOT_ROOT = re.compile(r"must be run as root|as a root user|permission denied|operation not permitted", re.IGNORECASE)


def _as_root(argv: list[str]) -> list[str]:
    """argv run as root: directly when edgekit is root, else through ``sudo -n``, which fails instead of asking."""
    if os.geteuid() == 0:
        return argv
    sudo = shutil.which("sudo") or shutil.which("sudo", path=_SBIN)
    return [sudo, "-n", *argv] if sudo else argv  # no sudo: the tool's own "run as root" message explains


def _sudoers_line(tools) -> str:
    return f"{getpass.getuser()} ALL=(root) NOPASSWD: {', '.join(tools)}"


def _run_tool(argv: list[str], tools: tuple[str, ...] = ()) -> str:
    """Run nvpmodel or jetson_clocks as root and return its stdout; any sign of failure is an EdgekitError.

    ``tools`` are the paths a sudoers line would have to allow (nvpmodel and jetson_clocks).
    """
    shown = " ".join(argv)
    command = _as_root(argv)
    try:
        # stdin is /dev/null, so a prompt is never answered: nvpmodel's "DO YOU WANT TO REBOOT NOW?" and
        # jetson_clocks' "Can I overwrite it? Y/N" read EOF and stop, instead of rebooting or hanging.
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                              check=False)
    except subprocess.TimeoutExpired:
        raise EdgekitError(f"'{shown}' did not finish within 60 s", "run it by hand to see why") from None
    output = f"{done.stdout}\n{done.stderr}"
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if command is not argv and done.returncode != 0 and "a password is required" in done.stderr:
        raise EdgekitError(f"'{shown}' needs root and sudo asks for a password (edgekit runs sudo -n: no prompt)",
                           "run edgekit as root, or allow passwordless sudo for nvpmodel and jetson_clocks with "
                           f"this line in sudo visudo: {_sudoers_line(tools or (argv[0],))}")
    if re.search(r"reboot required", output, re.IGNORECASE) and "-m" in argv:
        mode = argv[argv.index("-m") + 1]
        raise EdgekitError(f"power mode {mode} only takes effect after a reboot, so edgekit did not switch to it",
                           f"set it with 'sudo nvpmodel -m {mode}', reboot, then bench without --power-mode")
    # nvpmodel reports some failures on its output only, with exit code 0 (jtop looks for "NVPM ERROR" too).
    nvpm_error = next((line for line in lines if "NVPM ERROR" in line), None)
    if done.returncode != 0 or nvpm_error:
        denied = next((line for line in lines if _NOT_ROOT.search(line)), None)
        last = ((done.stderr.strip() or done.stdout.strip()).splitlines() or ["no message"])[-1]
        quoted = denied or nvpm_error or last
        hint = ("changing clocks and power modes needs root: run edgekit as root or with passwordless sudo, or leave "
                "out --lock-clocks" if denied else f"run '{shown}' by hand to see the whole output")
        raise EdgekitError(f"'{shown}' failed with exit code {done.returncode}: {quoted.strip()}", hint)
    return done.stdout


class ClockLock:
    """Lock the clocks for a run and put everything back afterwards, even when the run fails."""

    def __init__(self, power_mode: int | None = None, nvpmodel: str = "nvpmodel", jetson_clocks: str = "jetson_clocks"):
        self.power_mode = power_mode
        self.nvpmodel, self.jetson_clocks = nvpmodel, jetson_clocks
        self.before = None
        self.active = None  # the mode nvpmodel -q reports once the lock is on: what the results ran under
        self._store_dir: Path | None = None
        self._store: Path | None = None
        self._tools: tuple[str, ...] = ()

    def __enter__(self) -> ClockLock:
        from edgekit.devices.detect import query_nvpmodel

        clocks = _tool(self.jetson_clocks)
        # What a sudoers line must allow; nvpmodel is only looked for when a mode is to be set.
        self._tools = (shutil.which(self.nvpmodel) or shutil.which(self.nvpmodel, path=_SBIN) or self.nvpmodel, clocks)
        self.before = query_nvpmodel(self.nvpmodel)
        # jetson_clocks --store asks "File ... already exists. Can I overwrite it? Y/N" and exits 1 without an
        # answer, so the store file must not exist yet: a fresh name in a private folder, removed on exit.
        self._store_dir = Path(tempfile.mkdtemp(prefix="edgekit-jetson-clocks-"))
        self._store = self._store_dir / "clocks.conf"
        try:
            _run_tool([clocks, "--store", str(self._store)], self._tools)
        except BaseException:
            self._remove_store()  # nothing was changed yet: nothing to restore
            raise
        try:
            if self.power_mode is not None:
                _run_tool([_tool(self.nvpmodel), "-m", str(self.power_mode)], self._tools)
                self.active = query_nvpmodel(self.nvpmodel)  # the exit code does not say the mode was applied
                if self.active is None or self.active.id != self.power_mode:
                    seen = f"mode {self.active.id} ({self.active.name})" if self.active else "no mode"
                    raise EdgekitError(f"asked nvpmodel for power mode {self.power_mode} but 'nvpmodel -q' "
                                       f"reports {seen}", f"set it by hand (sudo nvpmodel -m {self.power_mode}; "
                                       "nvpmodel -q), then bench without --power-mode")
            else:
                self.active = self.before
            _run_tool([clocks], self._tools)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        errors = []
        # The mode first (switching it resets the clocks to the mode's defaults), then the stored clocks.
        if self.power_mode is not None and self.before is not None and self.before.id not in (None, self.power_mode):
            try:
                _run_tool([_tool(self.nvpmodel), "-m", str(self.before.id)], self._tools)
            except EdgekitError as e:
                errors.append(str(e))
        try:
            _run_tool([_tool(self.jetson_clocks), "--restore", str(self._store)], self._tools)
        except EdgekitError as e:
            errors.append(str(e))
        finally:
            self._remove_store()
        if errors and (not exc or exc[0] is None):  # never hide the error that ended the run
            raise EdgekitError(f"could not restore the clocks after the run: {' '.join(errors)}",
                               f"restore them by hand: sudo nvpmodel -m {getattr(self.before, 'id', 'ID')}; "
                               "sudo jetson_clocks --restore")

    def _remove_store(self) -> None:
        if self._store_dir is not None:
            shutil.rmtree(self._store_dir, ignore_errors=True)
            self._store_dir = None


def nvmap_mb(meminfo: str = "/proc/meminfo") -> float | None:
    """NvMapMemUsed (GPU allocations through nvmap, Jetson only) in MB, or None where absent."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    match = re.search(r"^NvMapMemUsed:\s*(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


class _TimingProbe(Progress):
    """Passes progress through; samples tegrastats and NvMap only while bench()'s timed loop runs."""

    def __init__(self, inner: Progress, tcfg, meminfo: str = "/proc/meminfo"):
        self.inner, self.tcfg, self.meminfo = inner, tcfg, meminfo
        self.samples, self.wall_seconds, self.nvmap_peak_mb = None, None, None

    @contextlib.contextmanager
    def step(self, description, total=None):
        with self.inner.step(description, total) as s:
            if not description.startswith(TIMING_STEP):
                yield s
                return
            from edgekit.devices.tegrastats import TegrastatsSampler

            sampler = TegrastatsSampler(self.tcfg.interval_ms, self.tcfg.tegrastats)
            stop = threading.Event()
            peak = [nvmap_mb(self.meminfo)]

            def poll():
                while not stop.wait(self.tcfg.interval_ms / 1000):
                    now = nvmap_mb(self.meminfo)
                    if now is not None:
                        peak[0] = max(peak[0] or 0.0, now)

            poller = threading.Thread(target=poll, daemon=True)
            sampler.start()
            poller.start()
            t0 = time.perf_counter()
            try:
                yield s
            except BaseException:
                stop.set()
                with contextlib.suppress(EdgekitError):  # the run's own error is the one to report
                    sampler.stop()
                raise
            self.wall_seconds = time.perf_counter() - t0
            stop.set()
            poller.join(timeout=5)
            self.samples = sampler.stop()
            self.nvmap_peak_mb = peak[0]

    def __call__(self, description, completed, total):
        self.inner(description, completed, total)

    def log(self, message):
        self.inner.log(message)


def observed_clocks(samples) -> dict:
    """Clock ranges (MHz) tegrastats printed during the run: GPU (GR3D), memory (EMC), CPU cores."""
    def rng(values):
        values = [v for v in values if v]
        return [min(values), max(values)] if values else None

    return {"gpu_mhz": rng(f for s in samples for f in s.gr3d_freq_mhz),
            "emc_mhz": rng(s.emc_freq_mhz for s in samples),
            "cpu_mhz": rng(c[1] for s in samples for c in s.cpu if c)}


def _jetson_block(sample_probe: _TimingProbe, runs: int, nvmap_before: float | None, model: str = "encoder") -> dict:
    """The board's figures over one timed loop; ``runs``: what the energy is divided by (inferences, or the tokens
    a decoder generated)."""
    from edgekit.benchmarks.gpu import hardware_label
    from edgekit.devices.tegrastats import summarize

    if sample_probe.wall_seconds is None:
        raise RuntimeError(f"bench() ran no step named '{TIMING_STEP}...': the Jetson sampling missed the timed loop")
    summary = summarize(sample_probe.samples, runs, sample_probe.wall_seconds)
    peak = sample_probe.nvmap_peak_mb
    return {"tegrastats": summary.to_dict(), "power_label": POWER_LABEL, "clocks": observed_clocks(sample_probe.samples),
            "nvmap_before_mb": nvmap_before, "nvmap_peak_mb": peak,
            "nvmap_model_mb": peak - nvmap_before if peak is not None and nvmap_before is not None else None,
            "energy_per": "generated token (the prefills' energy included)" if model == "decoder" else "inference",
            **hardware_label(f"{model} jetson")}


def bench_jetson(models: list, cfg, tcfg, progress: Progress | None = None, profile=None, jetson=None,
                 meminfo: str = "/proc/meminfo", decoder: bool = False):
    """Benchmark on this Jetson, one variant at a time, with tegrastats sampled during each timed loop.

    ``decoder``: decoder language models (benchmarks/decode.py) on onnxruntime, its CUDA provider on the GPU;
    energy is then per generated token."""
    from edgekit.benchmarks.bench import BenchReport, bench
    from edgekit.benchmarks.decode import DecodeBenchReport, bench_decoders
    from edgekit.runtimes.tensorrt import engine_options_for, ensure_engines
    from edgekit.devices.detect import detect_jetson

    progress = progress or Progress()
    info = jetson or detect_jetson()
    if info is None:
        raise EdgekitError("this machine is not a Jetson (no /etc/nv_tegra_release and no Jetson device tree)",
                           "run edgekit on the Jetson, or pass --host user@address to benchmark one over SSH from here")
    if profile is not None and info.profile and info.profile != profile.name:
        raise EdgekitError(f"this Jetson is a {info.profile}, not a {profile.name}",
                           f"pass --device {info.profile} (or --device jetson)")
    on_gpu = tcfg.compute == "gpu"
    runtime = tcfg.runtime or ("tensorrt" if on_gpu and not decoder else "onnxruntime")
    device = "cuda" if on_gpu else "cpu"
    reports = []
    with contextlib.ExitStack() as stack:
        lock = stack.enter_context(ClockLock(tcfg.power_mode)) if tcfg.lock_clocks else None
        if runtime == "tensorrt":
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgekit-engines-")))
            models = ensure_engines(models, engine_options_for(cfg, tcfg.engine), tmp, progress)
        for m in models:
            probe = _TimingProbe(progress, tcfg, meminfo)
            before = nvmap_mb(meminfo)
            if decoder:
                report = bench_decoders([m], cfg.replace(device=device), probe)
                v = report.variants[0]
                tokens = cfg.generations * cfg.new_tokens  # the timed loop's: the warm-up generation runs before it
                v["device"] = {**(v["device"] or {}), "jetson": _jetson_block(probe, tokens, before, "decoder")}
            else:
                report = bench([m], cfg.replace(device=device), probe)
                v = report.variants[0]
                v.device = {**(v.device or {}), "jetson": _jetson_block(probe, v.latency.iterations, before)}
            reports.append(report)
        from edgekit.devices.detect import query_nvpmodel

        # Seen while the run held the board (the lock restores the previous mode on the way out).
        observed = lock.active if lock is not None else query_nvpmodel()
    env = reports[0].environment
    env.update({"device": "jetson" if on_gpu else "jetson (CPU cores)",
                "jetson": {**info.to_dict(), "power_mode_observed": _mode(observed),
                           "clocks_locked": tcfg.lock_clocks, "power_mode_requested": tcfg.power_mode}})
    energy = (f"energy per token = mean {POWER_LABEL} x timed seconds / tokens generated" if decoder else
              f"energy per inference = mean {POWER_LABEL} x timed seconds / timed runs")
    method = (f"{reports[0].method}; Jetson: each variant timed alone (tegrastats measures the whole module), "
              f"tegrastats every {tcfg.interval_ms} ms during the timed loop only; {energy}; "
              f"clocks {'locked (jetson_clocks)' if tcfg.lock_clocks else 'left to DVFS'}")
    if decoder:
        return DecodeBenchReport([r.variants[0] for r in reports], reports[0].inputs, env, method,
                                 sum(r.seconds for r in reports))
    return BenchReport([r.variants[0] for r in reports], env, reports[0].inputs, method,
                       {**reports[0].config, "runtime": runtime, "compute": tcfg.compute})


def _mode(mode) -> dict | None:
    return {"name": mode.name, "id": mode.id} if mode is not None else None


def remote_bench_args(cfg, tcfg, target, decoder: bool = False) -> list[str]:
    """The ``edgekit bench`` options sent to the device (its own defaults for what is not given here)."""
    # --data is a file on this machine: bench_remote copies it beside the artifact and adds --data there.
    if decoder:  # the device's edgekit tells a decoder from its folder, and picks onnxruntime for it
        args = ["--new-tokens", str(cfg.new_tokens), "--generations", str(cfg.generations)]
        args += ["--prompt-len", str(cfg.prompt_len)] if cfg.prompt_len else []
    else:
        args = ["--iterations", str(cfg.iterations), "--min-seconds", f"{cfg.min_seconds:g}", "--warmup",
                str(cfg.warmup), "--batch-size", str(cfg.batch_size)]
        args += ["--seq-len", str(cfg.seq_len)] if cfg.seq_len else []
        args += ["--samples", str(cfg.samples)] if cfg.data else []
    if cfg.data and cfg.text_column:
        args += ["--text-column", cfg.text_column]
    if tcfg.threads_given:
        args += ["--threads", str(tcfg.threads_given)]
    if cfg.task:
        args += ["--task", cfg.task]
    if cfg.trust_remote_code:  # the user's opt-in holds on the device too, which opens the checkpoint itself
        args.append("--trust-remote-code")
    default = "onnxruntime" if tcfg.compute == "cpu" else "tensorrt"
    runtime = ["--runtime", tcfg.runtime or default] if tcfg.runtime or not decoder else []
    if target.kind == "jetson" and tcfg.compute == "cpu":
        # The device's CPU cores: a plain CPU bench there (no tegrastats: it needs the Jetson bench path).
        return args + ["--device", "cpu"] + runtime
    if target.kind == "jetson":
        args += ["--device", "jetson"] + runtime
        if tcfg.lock_clocks:
            args.append("--lock-clocks")
        if tcfg.power_mode is not None:
            args += ["--power-mode", str(tcfg.power_mode)]
    else:
        args += ["--device", target.kind] + (["--runtime", tcfg.runtime] if tcfg.runtime else [])
    if tcfg.engine.fp16:
        args.append("--fp16")
    return args


def bench_remote(models: list, cfg, tcfg, target, decoder: bool = False) -> dict:
    """Copy one artifact to the device, run edgekit bench there, bring its JSON report back.

    The caller (bench_on_target) has already checked that the model fits the device profile.
    """
    from edgekit.devices.remote import RemoteHost, run_remote_bench

    if len(models) != 1:
        raise EdgekitError(f"over SSH edgekit benchmarks one model at a time (got {len(models)})",
                           "run edgekit bench once per model")
    args = remote_bench_args(cfg, tcfg, target, decoder)
    host = RemoteHost.from_spec(tcfg.host, key_path=tcfg.key, known_hosts=tcfg.known_hosts,
                                remote_python=tcfg.remote_python)
    try:
        report = run_remote_bench(host, models[0], args, data=cfg.data)
    finally:
        host.close()
    report["remote"] = {"host": host.target, "device": tcfg.device, "bench_args": args}
    return report
