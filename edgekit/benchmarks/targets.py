"""Where ``edgekit bench`` runs: this CPU, this GPU (CUDA / TensorRT), this Jetson, or a device over SSH.

``--device`` takes cpu, cuda, tensorrt (onnxruntime's TensorRT provider), jetson, or a device profile name
from edgekit/devices/profiles. A profile with a known memory size is checked (check_fits) before anything
is built, copied or loaded. ``--runtime tensorrt`` builds an engine from each ONNX artifact first, on this
machine (engines only run where they were built), with its profile centred on the measured shape.

Decoder language models take the same targets through onnxruntime's CUDA / TensorRT providers
(benchmarks/decode.py), with the KV cache at the longest length counted in the memory-fit check; native
TensorRT engines are built for encoders only.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option
from edgekit.runtimes.tensorrt_plan import EngineOptions

KINDS = ("cpu", "cuda", "tensorrt", "jetson")
RUNTIMES = ("onnxruntime", "tensorrt", "torch")


class TargetConfig(StageConfig):
    """Where bench runs beyond this CPU: runtime, SSH host, Jetson controls (``edgekit bench`` options)."""

    # cpu | cuda | tensorrt | jetson | a device profile: BenchConfig.device on the command line
    device: str = option("cpu", "Where to bench.", cli=False)
    # None: from the artifact (checkpoint -> torch, ONNX -> onnxruntime, engine -> tensorrt)
    runtime: Optional[Literal["onnxruntime", "tensorrt", "torch"]] = option(
        None, "Runtime (default: from the artifact). tensorrt builds an engine from each ONNX first, here or on the "
              "--host device.")
    host: Optional[str] = option(None, "Benchmark on this device over SSH: user@address[:port] (the artifact is "
                                       "copied there).")
    key: Optional[str] = option(None, "SSH private key for --host (default: ssh-agent, ~/.ssh).", path=True)
    known_hosts: Optional[str] = option(None, "known_hosts for --host (default ~/.ssh/known_hosts).", path=True)
    remote_python: str = option("python3", "The Python that has edgekit on the --host device.")
    # --threads as the user gave it (never this machine's core count remotely)
    threads_given: Optional[int] = option(None, "Threads as given on the command line.", cli=False)
    compute: Literal["gpu", "cpu"] = option("gpu", "Jetson: run the model on its GPU or its CPU cores.")
    lock_clocks: bool = option(False, "Jetson: lock clocks with jetson_clocks for the run (root); restored after.")
    power_mode: Optional[int] = option(None, "Jetson: nvpmodel mode id to set with --lock-clocks; restored after.",
                                       ge=0)
    memory_budget_gb: Optional[float] = option(  # replaces the profile's memory in the fit check
        None, "Memory the model may use on a profiled device, checked before anything is copied (default: the "
              "profile's).", flag="--memory-budget", metavar="GB")
    engine: EngineOptions = Field(default_factory=EngineOptions)  # TensorRT builds (bench --fp16)
    tegrastats: str = option("tegrastats", "The tegrastats binary.", cli=False)
    interval_ms: int = option(100, "tegrastats sampling interval.", cli=False, ge=1)

    def beyond_this_cpu(self) -> bool:
        """Anything but a plain CPU bench? (Then bench's own path runs, untouched.)"""
        changed = [n for n in self.model_fields if self.meta(n).get("cli", True)
                   and getattr(self, n) != self.model_fields[n].get_default(call_default_factory=True)]
        return self.device != "cpu" or bool(changed) or self.engine != EngineOptions()


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


def _check_runtime_fits_artifacts(models: list, runtime: str | None) -> None:
    from edgekit.checkpoint import require_path
    from edgekit.runtimes.base import artifact_kind

    wanted = {"onnxruntime": ("onnx",), "torch": ("checkpoint",), "tensorrt": ("onnx", "engine")}.get(runtime)
    for m in models if wanted else ():
        kind = artifact_kind(require_path(m, "model"))
        if kind not in wanted:
            raise EdgekitError(f"--runtime {runtime} cannot run {m}, which is a {kind}",
                               "export checkpoints to ONNX first (edgekit export), or pick the runtime for the artifact")


def _check_decoder_options(tcfg: TargetConfig) -> None:
    if tcfg.runtime == "tensorrt":
        raise EdgekitError("edgekit builds native TensorRT engines for encoders only, not for decoder language models",
                           "leave out --runtime (decoders run on onnxruntime's CUDA provider, or its TensorRT provider "
                           "with --device tensorrt)")


def longest_tokens(model, cfg) -> int:
    """Prompt plus new tokens at their longest in this run: --prompt-len (default 128), or with --data and no
    --prompt-len the model's context, which bounds the real prompts."""
    import json

    from edgekit.benchmarks.decode import DEFAULT_PROMPT_LEN
    from edgekit.tasks import max_positions

    config = Path(model) / "config.json"
    context = max_positions(json.loads(config.read_text(encoding="utf-8"))) if config.is_file() else None
    if cfg.data and not cfg.prompt_len and context:
        return context
    return (cfg.prompt_len or DEFAULT_PROMPT_LEN) + cfg.new_tokens


def check_decoders_fit(models: list, cfg, profile) -> None:
    """check_models_fit for decoders: the KV cache at the longest length (batch 1) is counted with the runtime."""
    from edgekit.artifacts import folder_size
    from edgekit.checkpoint import require_path
    from edgekit.devices.profiles import DEFAULT_RUNTIME_OVERHEAD_BYTES, GIB, check_fits
    from edgekit.runtimes.decoder import cache_layout

    if profile is None:
        return
    for m in models:
        path = require_path(m, "model")
        layout, tokens = cache_layout(path), longest_tokens(path, cfg)
        kv = layout.bytes_at(tokens) if layout else 0
        try:
            check_fits(profile, folder_size(path), DEFAULT_RUNTIME_OVERHEAD_BYTES + kv)
        except EdgekitError as e:
            raise EdgekitError(f"{e.message} (the runtime's share counts the KV cache of {tokens} tokens at batch 1, "
                               f"{kv / GIB:.2f} GiB)", "make the model smaller, lower --prompt-len or --new-tokens, or "
                               "choose a device with more memory") from None


def bench_on_target(models: list, cfg, tcfg: TargetConfig, progress=None):
    """Run ``edgekit bench`` where ``tcfg`` says; a BenchReport (a DecodeBenchReport for decoder language models)
    here, or the device's report as a dict over SSH."""
    from edgekit.benchmarks.bench import bench
    from edgekit.benchmarks.decode import decoder_models
    from edgekit.progress import Progress

    progress = progress or Progress()
    target = resolve_target(tcfg.device)
    _check_options(target, tcfg)
    decoder = decoder_models(models)
    profile = fit_profile(target, tcfg)
    if decoder:
        _check_decoder_options(tcfg)
        check_decoders_fit(models, cfg, profile)  # before anything is copied or loaded
    else:
        check_models_fit(models, profile)  # before anything is built, copied or loaded
    if tcfg.host:
        from edgekit.benchmarks.jetson import bench_remote

        return bench_remote(models, cfg, tcfg, target, decoder)
    _check_runtime_fits_artifacts(models, tcfg.runtime)
    if target.kind == "jetson":
        from edgekit.benchmarks.jetson import bench_jetson

        return bench_jetson(models, cfg, tcfg, progress, profile=target.profile, decoder=decoder)
    device = target.kind  # cpu, cuda, or tensorrt (onnxruntime's provider)
    if decoder:
        from edgekit.benchmarks.decode import bench_decoders

        return bench_decoders(models, cfg.replace(device=device, fp16=tcfg.engine.fp16), progress)
    if tcfg.runtime == "tensorrt":
        with tempfile.TemporaryDirectory(prefix="edgekit-engines-") as tmp:
            from edgekit.runtimes.tensorrt import engine_options_for, ensure_engines

            engines = ensure_engines(models, engine_options_for(cfg, tcfg.engine), Path(tmp), progress)
            return bench(engines, cfg.replace(device="cuda"), progress)
    return bench(models, cfg.replace(device=device, fp16=tcfg.engine.fp16), progress)
