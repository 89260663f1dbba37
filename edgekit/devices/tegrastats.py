"""Read NVIDIA Jetson ``tegrastats`` lines: memory, CPU/GPU load, temperatures and power rails.

Written by hand because no maintained library parses tegrastats on its own: jetson-stats (jtop) reads the
hardware through its root service and keeps its old tegrastats parser internal, and NVIDIA publishes no
grammar. The format drifts between modules and JetPack releases, so every field is optional except RAM
(the one field every tegrastats release prints), and unknown fields are ignored rather than rejected:

    07-25-2026 09:08:28 RAM 20642/62817MB (lfb 1x2MB) CPU [23%@2201,off] EMC_FREQ 3%@3199
    GR3D_FREQ 12%@[1300,1300] cpu@52.968C VDD_GPU_SOC 5139mW/5139mW/5139mW VIN_SYS_5V0 5500mW/5500mW/5500mW

Power: ``module_power_mw`` is the *module's* power, never the carrier board's. Modules with a rail that
measures the whole module input (``VDD_IN`` on Orin NX/Nano and Xavier NX, ``POM_5V_IN`` on Nano/TX1)
report that rail; the others (AGX Orin, AGX Xavier, Thor) have no such rail and report the sum of their
rails, as jetson-stats does. ``VIN_SYS_5V0`` is *not* a total: on AGX Orin it reads less than
``VDD_GPU_SOC + VDD_CPU_CV`` (see the samples in shared/data/jetson). ``VIN`` on Thor is the carrier
board's input and is left out of the module figure (it is ``board_power_mw``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError

# Rails that measure the whole module input; the first one present is the module's power.
MODULE_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# Rails measured on the carrier board, outside the module: never part of module power.
BOARD_INPUT_RAILS = ("VIN",)
# "NAME a/b" pairs that are memory, not power.
_NOT_RAILS = {"RAM", "SWAP", "IRAM"}

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\b")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)([kMG]?)B")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)([kMG]?)B")
# Newer releases print "CPU [12%@2201,off]"; TX1-era ones "CPU [12%,off]@1224" with one shared clock.
_CPU = re.compile(r"\bCPU \[([^\]]*)\](?:@(\d+))?")
_CPU_CORE = re.compile(r"^(\d+)%(?:@(\d+))?$")
_EMC = re.compile(r"\bEMC_FREQ (?:(\d+)%)?(?:@(\d+))?")
# "GR3D_FREQ 10%@1300", "12%@[1300,1300]" (one clock per GPC), "@[1000,1000]" (Thor: no load), "0%".
_GR3D = re.compile(r"\bGR3D_FREQ (?:(\d+)%)?(?:@(?:\[([^\]]*)\]|(\d+)))?")
# "cpu@52.968C/52.968C" (JetPack 7) or "CPU@39.5C"; only the first value is the current temperature.
_TEMP = re.compile(r"(?<![\w%])([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b")
# "VDD_IN 5079mW/5079mW", "VDD_GPU_SOC 5139mW/5139mW/5139mW", "POM_5V_IN 2545/2547" (cur/avg[/max] mW).
_RAIL = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")

_UNIT_TO_MB = {"k": 1 / 1024, "": 1 / (1024 * 1024), "M": 1, "G": 1024}


@dataclass(frozen=True)
class TegrastatsSample:
    """One tegrastats line. Memory in MB, clocks in MHz, temperatures in °C, power in mW."""

    ram_used_mb: int
    ram_total_mb: int
    timestamp: str | None = None
    swap_used_mb: int | None = None
    swap_total_mb: int | None = None
    # One entry per core: (load %, clock MHz or None), or None for a core that is 'off'.
    cpu: tuple[tuple[int, int | None] | None, ...] = ()
    emc_load_pct: int | None = None
    emc_freq_mhz: int | None = None
    # None when the line carries no GPU load (Thor prints only the clocks).
    gr3d_load_pct: float | None = None
    # Always a tuple: one clock for "NN%@1300", one per GPC for the array form, empty when absent.
    gr3d_freq_mhz: tuple[int | None, ...] = ()
    temperatures: dict[str, float] = field(default_factory=dict)
    # name -> (current mW, average mW, max mW or None when the release prints pairs).
    rails: dict[str, tuple[int, int, int | None]] = field(default_factory=dict)

    @property
    def module_power_mw(self) -> int | None:
        """Power drawn by the Jetson module (not the carrier board), or None when no rail is printed."""
        for name in MODULE_INPUT_RAILS:
            if name in self.rails:
                return self.rails[name][0]
        module_rails = [cur for name, (cur, _, _) in self.rails.items() if name not in BOARD_INPUT_RAILS]
        return sum(module_rails) if module_rails else None

    @property
    def board_power_mw(self) -> int | None:
        """The carrier board's input power where the board measures it (Thor developer kit), else None."""
        for name in BOARD_INPUT_RAILS:
            if name in self.rails:
                return self.rails[name][0]
        return None


def _to_mb(value: str, unit: str) -> int:
    return int(int(value) * _UNIT_TO_MB[unit])


def _cpu_cores(body: str, shared_freq: str | None) -> tuple[tuple[int, int | None] | None, ...]:
    cores: list[tuple[int, int | None] | None] = []
    for item in (part.strip() for part in body.split(",")):
        match = _CPU_CORE.match(item)
        if not match:  # 'off', or something a future release invents: no load to report
            cores.append(None)
            continue
        freq = match.group(2) or shared_freq
        cores.append((int(match.group(1)), int(freq) if freq else None))
    return tuple(cores)


def _int_or_none(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() else None


def parse_line(line: str) -> TegrastatsSample:
    """Parse one line printed by ``tegrastats``; raise EdgekitError when it is not tegrastats output."""
    ram = _RAM.search(line)
    if not ram:
        shown = line.strip()[:80]
        raise EdgekitError(
            f"this is not a tegrastats line (no 'RAM used/total' field): {shown!r}",
            "pass the lines printed by tegrastats itself, without extra prefixes",
        )
    stamp = _TIMESTAMP.match(line)
    swap = _SWAP.search(line)
    cpu = _CPU.search(line)
    emc = _EMC.search(line)
    gr3d = _GR3D.search(line)

    gr3d_load: float | None = None
    gr3d_freqs: tuple[int | None, ...] = ()
    if gr3d:
        if gr3d.group(1) is not None:
            gr3d_load = float(gr3d.group(1))
        if gr3d.group(2) is not None:
            gr3d_freqs = tuple(_int_or_none(f) for f in gr3d.group(2).split(",") if f.strip())
        elif gr3d.group(3) is not None:
            gr3d_freqs = (int(gr3d.group(3)),)

    rails: dict[str, tuple[int, int, int | None]] = {}
    for name, cur, avg, peak in _RAIL.findall(line):
        if name not in _NOT_RAILS:
            rails[name] = (int(cur), int(avg), int(peak) if peak else None)

    temperatures: dict[str, float] = {}
    for name, value in _TEMP.findall(line):
        temperatures.setdefault(name.lower(), float(value))

    return TegrastatsSample(
        timestamp=stamp.group(1) if stamp else None,
        ram_used_mb=_to_mb(ram.group(1), ram.group(3)),
        ram_total_mb=_to_mb(ram.group(2), ram.group(3)),
        swap_used_mb=_to_mb(swap.group(1), swap.group(3)) if swap else None,
        swap_total_mb=_to_mb(swap.group(2), swap.group(3)) if swap else None,
        cpu=_cpu_cores(cpu.group(1), cpu.group(2)) if cpu else (),
        emc_load_pct=int(emc.group(1)) if emc and emc.group(1) else None,
        emc_freq_mhz=int(emc.group(2)) if emc and emc.group(2) else None,
        gr3d_load_pct=gr3d_load,
        gr3d_freq_mhz=gr3d_freqs,
        temperatures=temperatures,
        rails=rails,
    )


class TegrastatsSampler:
    """Runs ``tegrastats --interval MS`` in the background and keeps every sample it prints.

    Use as ``with TegrastatsSampler(interval_ms=100) as sampler: ...`` then ``sampler.samples``, or
    ``start()`` / ``stop()``. ``tegrastats`` is any executable printing tegrastats lines, so tests can
    pass a script. Some rails are only printed when tegrastats runs as root.
    """

    def __init__(self, interval_ms: int = 100, tegrastats: str | Path = "tegrastats",
                 extra_args: Sequence[str] = ()):
        if interval_ms < 1:
            raise ValueError("interval_ms must be at least 1")
        self.interval_ms = int(interval_ms)
        self.tegrastats = str(tegrastats)
        self.extra_args = tuple(extra_args)
        self.skipped_lines = 0
        self._samples: list[TegrastatsSample] = []
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._stderr = None

    def _executable(self) -> str:
        found = shutil.which(self.tegrastats)
        if not found:
            raise EdgekitError(
                f"tegrastats was not found (looked for '{self.tegrastats}')",
                "run this on a Jetson with JetPack installed, or pass the path of tegrastats",
            )
        return found

    def start(self) -> TegrastatsSampler:
        if self._proc is not None:
            raise RuntimeError("this TegrastatsSampler is already running")
        argv = [self._executable(), "--interval", str(self.interval_ms), *self.extra_args]
        # stderr goes to a file: a pipe nobody reads could fill and stall tegrastats.
        self._stderr = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, stdin=subprocess.DEVNULL,
                                      text=True, encoding="utf-8", errors="replace", bufsize=1)
        self._reader = threading.Thread(target=self._read, name="tegrastats-reader", daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if not line.strip():
                continue
            try:
                sample = parse_line(line)
            except EdgekitError:  # a warning or a banner between samples
                self.skipped_lines += 1
                continue
            with self._lock:
                self._samples.append(sample)

    @property
    def samples(self) -> list[TegrastatsSample]:
        with self._lock:
            return list(self._samples)

    def stop(self) -> list[TegrastatsSample]:
        """Stop tegrastats and return every sample collected since ``start()``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return self.samples
        exited_early = proc.poll() is not None
        if not exited_early:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        err = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            err = self._stderr.read().strip()
            self._stderr.close()
            self._stderr = None
        samples = self.samples
        if exited_early and proc.returncode != 0 and not samples:
            last = err.splitlines()[-1] if err else "no message"
            raise EdgekitError(
                f"tegrastats exited with code {proc.returncode} before printing a sample: {last}",
                "run it by hand (sudo tegrastats) to see why; some JetPack releases need root for it",
            )
        return samples

    def __enter__(self) -> TegrastatsSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class TegrastatsSummary:
    """What a run cost on the device. RAM is the whole system's (shared CPU+GPU memory on Jetson)."""

    n_samples: int
    n_inferences: int
    wall_seconds: float
    ram_peak_mb: int
    ram_mean_mb: float
    gr3d_mean_load_pct: float | None
    module_power_mean_mw: float | None
    energy_per_inference_mj: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize(samples: Sequence[TegrastatsSample], n_inferences: int, wall_seconds: float) -> TegrastatsSummary:
    """Peak/mean RAM, mean GPU load, mean module power and energy per inference over one run.

    Energy per inference (mJ) = mean module power (mW) × wall seconds / inferences: it charges the idle
    power of the module to the run too, which is what a deployed device pays.
    """
    if n_inferences <= 0 or wall_seconds <= 0:
        raise ValueError("n_inferences and wall_seconds must be positive")
    if not samples:
        raise EdgekitError(
            "no tegrastats sample was collected during the run",
            "run for longer than the sampling interval, or lower the interval",
        )
    power = _mean(p for p in (s.module_power_mw for s in samples) if p is not None)
    return TegrastatsSummary(
        n_samples=len(samples),
        n_inferences=n_inferences,
        wall_seconds=wall_seconds,
        ram_peak_mb=max(s.ram_used_mb for s in samples),
        ram_mean_mb=sum(s.ram_used_mb for s in samples) / len(samples),
        gr3d_mean_load_pct=_mean(s.gr3d_load_pct for s in samples if s.gr3d_load_pct is not None),
        module_power_mean_mw=power,
        energy_per_inference_mj=power * wall_seconds / n_inferences if power is not None else None,
    )
