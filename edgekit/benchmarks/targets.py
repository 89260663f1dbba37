"""Where ``edgekit bench`` runs: this CPU, this GPU (CUDA / TensorRT), this Jetson, or a device over SSH.

``--device`` takes cpu, cuda, tensorrt (onnxruntime's TensorRT provider), jetson, or a device profile name
from edgekit/devices/profiles. A profile with a known memory size is checked (check_fits) before anything
is built, copied or loaded. ``--runtime tensorrt`` builds an engine from each ONNX artifact first, on this
machine (engines only run where they were built), with its profile centred on the measured shape.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.runtimes.tensorrt_plan import EngineOptions

KINDS = ("cpu", "cuda", "tensorrt", "jetson")
RUNTIMES = ("onnxruntime", "tensorrt", "torch")


@dataclass
class TargetConfig:
    device: str = "cpu"
    runtime: str | None = None  # None: from the artifact (checkpoint -> torch, ONNX -> onnxruntime, engine -> tensorrt)
    host: str | None = None  # user@address[:port]: run on that device over SSH
    key: str | None = None
    known_hosts: str | None = None
    remote_python: str = "python3"
    threads_given: int | None = None  # --threads as the user gave it (never this machine's core count remotely)
    compute: str = "gpu"  # Jetson: its GPU, or its CPU cores
    lock_clocks: bool = False  # Jetson: jetson_clocks (and nvpmodel -m power_mode) for the run, restored after
    power_mode: int | None = None
    memory_budget_gb: float | None = None  # replaces the profile's memory in the fit check
    engine: EngineOptions = field(default_factory=EngineOptions)
    tegrastats: str = "tegrastats"
    interval_ms: int = 100


@dataclass(frozen=True)
class Target:
    kind: str  # cpu | cuda | tensorrt | jetson
    profile: object | None  # DeviceProfile


def resolve_target(name: str):
    from edgekit.devices.profiles import list_profiles

    if name in KINDS:
        return Target(name, None)
    profiles = {p.name: p for p in list_profiles()}
    if name not in profiles:
        raise EdgekitError(f"unknown device '{name}'",
                           f"use {', '.join(KINDS)} or a device profile ({', '.join(profiles)}; see edgekit devices)")
    return Target(profiles[name].kind, profiles[name])


def _check_options(target: Target, tcfg: TargetConfig) -> None:
    if tcfg.runtime is not None and tcfg.runtime not in RUNTIMES:
        raise EdgekitError(f"unknown runtime '{tcfg.runtime}'", f"use one of: {', '.join(RUNTIMES)}")
    if target.kind != "jetson" and (tcfg.lock_clocks or tcfg.power_mode is not None or tcfg.compute != "gpu"):
        raise EdgekitError("--lock-clocks, --power-mode and --compute are Jetson options",
                           "pass --device jetson (or a Jetson profile) with them")
    if tcfg.power_mode is not None and not tcfg.lock_clocks:
        raise EdgekitError("--power-mode is applied with --lock-clocks", "add --lock-clocks")
    if tcfg.compute not in ("gpu", "cpu"):
        raise EdgekitError(f"unknown --compute '{tcfg.compute}'", "use gpu or cpu")
    on_cpu = target.kind == "cpu" or (target.kind == "jetson" and tcfg.compute == "cpu")
    if on_cpu and tcfg.runtime == "tensorrt":
        raise EdgekitError("TensorRT runs on the GPU, not on the CPU",
                           "pass --device cuda or jetson, or --runtime onnxruntime")
    if not on_cpu and tcfg.runtime == "torch":
        raise EdgekitError("edgekit's torch runtime runs on the CPU only", "use --runtime onnxruntime or tensorrt on a GPU")
    if target.kind == "tensorrt" and tcfg.runtime not in (None, "onnxruntime"):
        raise EdgekitError("--device tensorrt is onnxruntime's TensorRT provider",
                           "for native TensorRT engines pass --device cuda --runtime tensorrt")


def fit_profile(target: Target, tcfg: TargetConfig):
    profile = target.profile
    if tcfg.memory_budget_gb is not None:
        if profile is None:
            raise EdgekitError("--memory-budget applies to a device profile",
                               "pass --device with a profile name (see edgekit devices)")
        if tcfg.memory_budget_gb <= 0:
            raise EdgekitError("--memory-budget must be positive", "pass the memory in GB the model may use")
        profile = replace(profile, memory_gb=tcfg.memory_budget_gb)
    return profile


def check_models_fit(models: list, profile) -> None:
    """Refuse before copying, building or loading anything when a model cannot fit the device."""
    from edgekit.artifacts import folder_size
    from edgekit.checkpoint import require_path
    from edgekit.devices.profiles import check_fits

    if profile is None:
        return
    for m in models:
        check_fits(profile, folder_size(require_path(m, "model")))


def engine_options_for(cfg, base: EngineOptions) -> EngineOptions:
    """Centre the engine's profile on the measured shape (TensorRT tunes its kernels for OPT)."""
    opts = base
    if opts.batch is None and opts.min_shapes is None:
        bs = cfg.batch_size
        opts = replace(opts, batch=(1, bs, max(bs, 32)))
    if opts.seq is None and opts.min_shapes is None and cfg.seq_len:
        opts = replace(opts, seq=(1, cfg.seq_len, max(cfg.seq_len, 128)))
    return opts


def ensure_engines(models: list, options: EngineOptions, workdir: Path, progress) -> list[Path]:
    """Engine folders for the models: ONNX artifacts are built into ``workdir`` here, engines kept as they are."""
    from edgekit.checkpoint import require_path
    from edgekit.runtimes.base import artifact_kind
    from edgekit.runtimes.tensorrt import build_engine

    out = []
    for i, m in enumerate(models):
        p = require_path(m, "model")
        kind = artifact_kind(p)
        if kind == "engine":
            out.append(p)
        elif kind == "onnx":
            name = p.name if p.is_dir() else p.parent.name
            out.append(build_engine(p, workdir / f"{name}-engine-{i}", options, progress=progress).parent)
        else:
            raise EdgekitError(f"{p} is a checkpoint; TensorRT builds engines from ONNX",
                               "export it first (edgekit export), then bench the ONNX folder")
    return out


def _check_runtime_fits_artifacts(models: list, runtime: str | None) -> None:
    from edgekit.checkpoint import require_path
    from edgekit.runtimes.base import artifact_kind

    wanted = {"onnxruntime": ("onnx",), "torch": ("checkpoint",), "tensorrt": ("onnx", "engine")}.get(runtime)
    for m in models if wanted else ():
        kind = artifact_kind(require_path(m, "model"))
        if kind not in wanted:
            raise EdgekitError(f"--runtime {runtime} cannot run {m}, which is a {kind}",
                               "export checkpoints to ONNX first (edgekit export), or pick the runtime for the artifact")


def bench_on_target(models: list, cfg, tcfg: TargetConfig, progress=None):
    """Run ``edgekit bench`` where ``tcfg`` says; a BenchReport here, or the device's report as a dict over SSH."""
    from edgekit.benchmarks.bench import bench
    from edgekit.progress import Progress

    progress = progress or Progress()
    target = resolve_target(tcfg.device)
    _check_options(target, tcfg)
    check_models_fit(models, fit_profile(target, tcfg))  # before anything is built, copied or loaded
    if tcfg.host:
        from edgekit.benchmarks.jetson import bench_remote

        return bench_remote(models, cfg, tcfg, target)
    _check_runtime_fits_artifacts(models, tcfg.runtime)
    if target.kind == "jetson":
        from edgekit.benchmarks.jetson import bench_jetson

        return bench_jetson(models, cfg, tcfg, progress, profile=target.profile)
    device = target.kind  # cpu, cuda, or tensorrt (onnxruntime's provider)
    if tcfg.runtime == "tensorrt":
        with tempfile.TemporaryDirectory(prefix="edgekit-engines-") as tmp:
            engines = ensure_engines(models, engine_options_for(cfg, tcfg.engine), Path(tmp), progress)
            return bench(engines, replace(cfg, device="cuda"), progress)
    return bench(models, replace(cfg, device=device), progress)
