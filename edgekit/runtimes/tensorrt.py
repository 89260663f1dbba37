"""Native TensorRT: build ``model.engine`` from an ONNX folder ON the target, and load it behind Session.

Engines and timing caches are tied to the GPU architecture and the TensorRT version, so a build writes
``model.engine.json`` beside the engine (TensorRT, CUDA, GPU name, compute capability, JetPack, the plan)
and loading checks it against the machine before TensorRT sees the bytes.

TensorRT 10 (JetPack 6 on Orin: 10.3; JetPack 7 on Thor: 10.13) and 11 (x86 and SBSA servers; its release
notes say JetPack is not supported) differ in a few names; ``trt_api`` reads them
once by attribute, and every TensorRT name this module uses is listed in TENSORRT_API /
TENSORRT_API_OPTIONAL so a test can check them against an installed TensorRT.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError, MissingExtra
from edgekit.runtimes.tensorrt_plan import (ENGINE_NAME, SIDECAR_NAME, SIDECAR_SCHEMA, BuildPlan, EngineOptions,
                                            OnnxInput, check_parsable, check_sidecar, plan_build)

__all__ = ["EngineOptions", "BuildPlan", "plan_build", "check_sidecar", "build_engine", "load_tensorrt",
           "read_onnx_summary", "machine_facts", "trt_api", "TENSORRT_API", "TENSORRT_API_OPTIONAL"]

# Every TensorRT attribute used unconditionally below (dotted from the tensorrt module).
TENSORRT_API = [
    "__version__", "nptype", "Logger", "Logger.WARNING",
    "Builder", "Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
    "Builder.build_serialized_network", "INetworkDefinition.num_inputs", "INetworkDefinition.get_input",
    "ITensor.name", "OnnxParser", "OnnxParser.parse_from_file", "OnnxParser.num_errors", "OnnxParser.get_error",
    "IBuilderConfig.set_memory_pool_limit", "IBuilderConfig.set_flag", "IBuilderConfig.add_optimization_profile",
    "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache", "IBuilderConfig.get_timing_cache",
    "ITimingCache.serialize", "MemoryPoolType.WORKSPACE", "IOptimizationProfile.set_shape",
    "Runtime", "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_profile_shape",
    "ICudaEngine.create_execution_context", "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3", "TensorIOMode.INPUT",
]
# Looked up with hasattr in trt_api only: present in some releases, absent in others.
TENSORRT_API_OPTIONAL = [
    "NetworkDefinitionCreationFlag.STRONGLY_TYPED",  # 10.x; deprecated and ignored in 11 (always strongly typed)
    "BuilderFlag.FP16",  # 10.x; removed in 11
    "ICudaEngine.device_memory_size_v2",  # 10.1+ and 11
    "ICudaEngine.device_memory_size",  # 10.0; removed in 11
]


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingExtra("tensorrt", "tensorrt") from exc
    return tensorrt


@dataclass(frozen=True)
class TrtApi:
    """The version-dependent parts of the installed TensorRT, read once by attribute."""

    version: str
    major: int
    strongly_typed_flag: object | None  # NetworkDefinitionCreationFlag.STRONGLY_TYPED, None where absent
    fp16_flag: object | None  # BuilderFlag.FP16, None on 11
    device_memory_attr: str | None  # ICudaEngine attribute giving the activation memory

    def network_flags(self, plan: BuildPlan) -> int:
        # 11 is always strongly typed and ignores the flag; 10 needs it for Q/DQ networks.
        if plan.strongly_typed and self.major < 11 and self.strongly_typed_flag is not None:
            return 1 << int(self.strongly_typed_flag)
        return 0

    def activation_bytes(self, engine) -> int | None:
        return int(getattr(engine, self.device_memory_attr)) if self.device_memory_attr else None


def trt_api(trt) -> TrtApi:
    from edgekit.runtimes.tensorrt_plan import tensorrt_major

    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    builder_flags = getattr(trt, "BuilderFlag", None)
    engine_cls = getattr(trt, "ICudaEngine", None)
    memory_attr = next((a for a in ("device_memory_size_v2", "device_memory_size") if hasattr(engine_cls, a)), None)
    return TrtApi(version=str(trt.__version__), major=tensorrt_major(trt.__version__),
                  strongly_typed_flag=getattr(flags, "STRONGLY_TYPED", None),
                  fp16_flag=getattr(builder_flags, "FP16", None), device_memory_attr=memory_attr)


@dataclass(frozen=True)
class OnnxSummary:
    inputs: tuple[OnnxInput, ...]
    has_qdq: bool
    has_fp16: bool
    asymmetric_qdq: int  # Q/DQ nodes whose zero point is not 0 (TensorRT refuses them)
    op_types: frozenset = frozenset()  # every node's op type (TensorRT's parser cannot import some)


def read_onnx_summary(onnx_path) -> OnnxSummary:
    """Inputs (with dynamic dims), Q/DQ presence and FP16 types of an ONNX file, without loading weights data."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    inputs = []
    for i in g.input:
        if i.name in inits:
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in i.type.tensor_type.shape.dim)
        inputs.append(OnnxInput(i.name, dims))
    qdq = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    asym = 0
    for n in qdq:
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        if zp is not None and zp.data_location != onnx.TensorProto.EXTERNAL and np.any(numpy_helper.to_array(zp) != 0):
            asym += 1
    f16 = onnx.TensorProto.FLOAT16
    typed = list(g.input) + list(g.output) + list(g.value_info)
    has_fp16 = (any(t.data_type == f16 for t in g.initializer)
                or any(v.type.tensor_type.elem_type == f16 for v in typed)
                or any(n.op_type == "Cast" and any(a.name == "to" and a.i == f16 for a in n.attribute) for n in g.node))
    return OnnxSummary(tuple(inputs), bool(qdq), has_fp16, asym, frozenset(n.op_type for n in g.node))


def machine_facts(trt=None) -> dict:
    """What an engine is tied to, for this machine: TensorRT, CUDA, GPU and (on Jetson) JetPack."""
    from edgekit.devices.detect import detect_jetson
    from edgekit.runtimes.cuda_rt import device_facts

    trt = trt or import_tensorrt()
    facts = {"tensorrt": str(trt.__version__), **device_facts(0)}
    jetson = detect_jetson(query_power_mode=False)
    facts.update({"jetpack": jetson.jetpack if jetson else None, "l4t": jetson.l4t if jetson else None})
    return facts


def default_timing_cache(facts: dict) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgekit" / "tensorrt"
    return base / f"timing-trt{facts['tensorrt']}-sm{facts['compute_capability'].replace('.', '')}.cache"


@dataclass
class EngineReport:
    engine: str
    plan: dict
    built_with: dict
    engine_bytes: int
    seconds: float
    warnings: list
    schema_version: int = SIDECAR_SCHEMA

    def to_dict(self) -> dict:
        return {"kind": "EngineReport", **asdict(self)}


def _parse(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).strip() for i in range(parser.num_errors))[:600]
        raise EdgekitError(f"TensorRT could not parse {onnx_path}: {errors or 'no message'}",
                           "check that the ONNX loads in onnxruntime, and that its opset is supported by this TensorRT")
    return parser


def _engine_from_plan(trt, api: TrtApi, onnx_path: Path, plan: BuildPlan, progress) -> tuple[bytes, bytes | None]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(api.network_flags(plan))
    parser = _parse(trt, network, logger, onnx_path)  # noqa: F841 - the parser must outlive the network's use
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    missing = sorted(set(plan.profiles) - names)
    if missing:
        raise EdgekitError(f"TensorRT's network has no input {', '.join(missing)}", "rebuild from the ONNX edgekit wrote")
    config = builder.create_builder_config()
    if plan.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    if plan.fp16_flag:
        if api.fp16_flag is None:  # the plan was made for another TensorRT than the one installed
            raise EdgekitError(f"TensorRT {api.version} has no FP16 builder flag", "plan the build for this TensorRT")
        config.set_flag(api.fp16_flag)
    if plan.profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in plan.profiles.items():
            profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        config.add_optimization_profile(profile)
    cache_file = Path(plan.timing_cache) if plan.timing_cache else None
    if cache_file is not None:
        old = cache_file.read_bytes() if cache_file.is_file() else b""
        # A cache from another TensorRT/GPU is rejected rather than half-used (ignore_mismatch False).
        if not config.set_timing_cache(config.create_timing_cache(old), False):
            raise EdgekitError(f"the timing cache {cache_file} was made by another TensorRT or GPU",
                               "delete it, pass another --timing-cache, or --no-timing-cache")
    with progress.step("Building the TensorRT engine (minutes for a large model)"):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekitError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)",
                           "a profile range too large for the GPU memory is the usual cause: try smaller --batch/--seq")
    cache = bytes(config.get_timing_cache().serialize()) if cache_file is not None else None
    return bytes(serialized), cache


# The profile whose TensorRT a plan uses when none is named and none is installed: any discrete CUDA GPU.
DEFAULT_PLAN_DEVICE = "cuda-gpu"


def planning_version(tensorrt_version: str | None = None, device: str | None = None) -> tuple[str, str]:
    """The TensorRT version to plan an engine for, and where it came from (said beside the plan).

    A plan needs only the version, never TensorRT itself: the version given; else the newest one the named
    device profile records; else the installed TensorRT's; else the generic CUDA GPU profile's.
    """
    from edgekit.devices.profiles import get_profile

    def from_profile(name: str) -> str:
        versions = get_profile(name).tensorrt
        if not versions:
            raise EdgekitError(f"the device profile {name} records no TensorRT version",
                               "choose a GPU or Jetson profile with --device (edgekit devices lists them), "
                               "or pass --tensorrt-version")
        return versions[-1]

    if tensorrt_version is not None and device is not None:
        raise EdgekitError("--tensorrt-version and --device both choose the TensorRT version to plan for",
                           "pass only one of them")
    if tensorrt_version is not None:
        return tensorrt_version, "given with --tensorrt-version"
    if device is not None:
        return from_profile(device), f"from the device profile {device} (the newest it records)"
    try:
        return str(import_tensorrt().__version__), "the TensorRT installed here"
    except MissingExtra:
        return from_profile(DEFAULT_PLAN_DEVICE), (
            f"from the device profile {DEFAULT_PLAN_DEVICE} (any CUDA GPU), because TensorRT is not installed "
            "here; --device PROFILE or --tensorrt-version X plans for another target")


def plan_engine(onnx: Path, opts: EngineOptions, tensorrt_version: str,
                summary: OnnxSummary | None = None) -> tuple[BuildPlan, EngineOptions, dict]:
    """The build plan of ``onnx`` for a TensorRT version (no TensorRT needed), the options it was planned with
    (the sequence range capped at the model's positions unless they say otherwise) and the model's config.json.
    ``summary`` is ``read_onnx_summary(onnx)`` where the caller has already read it.
    """
    config_file = onnx.parent / "config.json"
    model_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if opts.max_positions is None and model_config.get("max_position_embeddings"):
        opts = opts.replace(max_positions=model_config["max_position_embeddings"])
    s = summary or read_onnx_summary(onnx)
    plan = plan_build(s.inputs, opts, tensorrt_version, has_qdq=s.has_qdq, has_fp16=s.has_fp16,
                      asymmetric_qdq=s.asymmetric_qdq, op_types=s.op_types)
    return plan, opts, model_config


def build_engine(onnx_path, out_dir, options: EngineOptions | None = None, overwrite: bool = False,
                 progress=None) -> Path:
    """ONNX folder (or file) -> ``out_dir/model.engine`` + sidecar, built on THIS machine; returns the engine path."""
    from edgekit.version import __version__
    from edgekit.artifacts import ONNX_FILE_SUFFIXES, check_output_dir, copy_side_file, sha256_file, staged_output
    from edgekit.checkpoint import require_path
    from edgekit.progress import Progress
    from edgekit.runtimes.base import ARTIFACT_FILE, onnx_file, read_artifact_meta
    from edgekit.tasks import detect_task

    progress = progress or Progress()
    src = require_path(onnx_path, "model")
    if (src if src.is_dir() else src.parent).joinpath(ENGINE_NAME).is_file():
        raise EdgekitError(f"{src} already holds a TensorRT engine", "build from the ONNX folder it came from")
    onnx = onnx_file(src)
    folder = onnx.parent
    check_output_dir(Path(out_dir).resolve(), overwrite)  # before a build that can take minutes
    summary = read_onnx_summary(onnx)
    check_parsable(summary.op_types)  # said even where TensorRT is missing: no TensorRT could build this ONNX
    trt = import_tensorrt()
    api = trt_api(trt)
    plan, opts, model_config = plan_engine(onnx, options or EngineOptions(), api.version, summary)
    facts = machine_facts(trt)
    if plan.timing_cache is None and opts.use_timing_cache:
        plan.timing_cache = str(default_timing_cache(facts))
    t0 = time.perf_counter()
    engine_bytes, cache = _engine_from_plan(trt, api, onnx, plan, progress)
    meta = read_artifact_meta(onnx)
    task = meta.get("task") or (detect_task(model_config).name if model_config else None)
    with staged_output(out_dir, overwrite, protect=(folder,)) as staging:
        for f in folder.iterdir():  # tokenizer and config travel with the engine; the ONNX does not
            if f.is_file() and not f.name.endswith(ONNX_FILE_SUFFIXES) and f.name != ARTIFACT_FILE:
                copy_side_file(f, staging / f.name)
        (staging / ENGINE_NAME).write_bytes(engine_bytes)
        sidecar = {"schema_version": SIDECAR_SCHEMA, "kind": "tensorrt-engine", "engine": ENGINE_NAME,
                   "built_with": facts, "plan": plan.to_dict(), "options": opts.to_dict(),
                   "source_onnx": str(folder.resolve()), "onnx_sha256": sha256_file(onnx),
                   "task": task, "edgekit": __version__, "seconds": time.perf_counter() - t0}
        (staging / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2))
        (staging / ARTIFACT_FILE).write_text(json.dumps(
            {**meta, "stage": "engine", "task": task, "onnx": str(folder.resolve()), "source": meta.get("source")},
            indent=2))
    if cache is not None:  # written after the engine: a failed build never leaves a half-written cache
        cache_path = Path(plan.timing_cache)
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cache)
        tmp.replace(cache_path)
    return Path(out_dir).resolve() / ENGINE_NAME


def engine_report(engine_path: Path, warnings: list | None = None) -> EngineReport:
    sidecar = json.loads((engine_path.parent / SIDECAR_NAME).read_text())
    return EngineReport(str(engine_path), sidecar["plan"], sidecar["built_with"], engine_path.stat().st_size,
                        sidecar.get("seconds", 0.0), warnings or [])


GPU_DEVICES = ("cuda", "gpu", "tensorrt", "jetson")


def engine_file(path: Path) -> Path:
    path = Path(path)
    if path.is_file() and path.suffix == ".engine":
        return path
    if (path / ENGINE_NAME).is_file():
        return path / ENGINE_NAME
    hint_dir = path if path.is_dir() else path.parent
    raise EdgekitError(f"{path} holds no TensorRT engine ({ENGINE_NAME})",
                       f"build one on this machine first: edgekit engine build {hint_dir} -o ENGINE_DIR")


def load_tensorrt(path, device="cuda", threads=None, task=None):
    """Load ``model.engine`` after checking that it was built for this TensorRT and GPU."""
    from edgekit.runtimes.tensorrt_session import TrtSession, open_engine
    from edgekit.tasks import TASKS

    if device not in GPU_DEVICES:
        raise EdgekitError(f"a TensorRT engine runs on the GPU, not on '{device}'", "pass --device cuda")
    engine_path = engine_file(Path(path))
    sidecar_file = engine_path.with_name(engine_path.name + ".json")
    sidecar = json.loads(sidecar_file.read_text()) if sidecar_file.is_file() else None
    trt = import_tensorrt()
    warnings = check_sidecar(sidecar, machine_facts(trt), str(engine_path), str(engine_path.parent))
    meta_task = (sidecar or {}).get("task")
    task_name = task or meta_task
    if not task_name:
        raise EdgekitError(f"the task of {engine_path} is unknown (its sidecar records none)", "pass --task")
    t = TASKS[task_name]
    runtime, engine, context, names, outputs = open_engine(trt, engine_path)
    if t.output not in outputs:
        raise EdgekitError(f"{engine_path} has no output '{t.output}' (it has {', '.join(outputs)})",
                           "build the engine from an edgekit export")
    api = trt_api(trt)
    info = {"trt": trt, "runtime": runtime, "engine": engine, "context": context, "outputs": outputs, "warnings": warnings,
            "activation_bytes": api.activation_bytes(engine), "sidecar": sidecar}
    return TrtSession("tensorrt", engine_path, t.name, names, t.output, device, threads, info)


# ---- engines for a benchmark (bench on a GPU target and on a Jetson both need them) -------------------


def engine_options_for(cfg, base: EngineOptions) -> EngineOptions:
    """Centre the engine's profile on the measured shape (TensorRT tunes its kernels for OPT)."""
    opts = base
    if opts.batch is None and opts.min_shapes is None:
        bs = cfg.batch_size
        opts = opts.replace(batch=(1, bs, max(bs, 32)))
    if opts.seq is None and opts.min_shapes is None and cfg.seq_len:
        opts = opts.replace(seq=(1, cfg.seq_len, max(cfg.seq_len, 128)))
    return opts


def ensure_engines(models: list, options: EngineOptions, workdir: Path, progress) -> list[Path]:
    """Engine folders for the models: ONNX artifacts are built into ``workdir`` here, engines kept as they are."""
    from edgekit.checkpoint import require_path
    from edgekit.runtimes.base import artifact_kind

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
