"""Planning a TensorRT engine build, as pure functions (no TensorRT, no GPU): testable anywhere.

What the plan decides, from the ONNX inputs, the user's options and the TensorRT version:
- one optimization profile (min/opt/max) for the dynamic batch and sequence axes;
- a strongly typed network when the ONNX carries Q/DQ nodes: INT8 is *explicit* quantization. TensorRT
  10.1 deprecated and 11.0 removed the implicit INT8 calibrators and the INT8/FP16 builder flags, and
  implicit INT8 on BERT silently falls back to float (TensorRT#2658). TensorRT 11 is always strongly typed;
- a strongly typed network too when the ONNX carries FP16 tensors: weakly typed and without the FP16 flag,
  TensorRT 10 before 10.12 runs them in FP32;
- a refusal of ONNX Runtime's dynamic INT8 ops (MatMulInteger, DynamicQuantizeLinear, ...), which TensorRT's
  ONNX parser has no importer for (its operator support matrix marks them N);
- the FP16 builder flag only on TensorRT 10 and only when asked (on 11 an FP16 engine needs an ONNX whose
  tensors are FP16: ModelOpt AutoCast converts one);
- the workspace limit and the timing cache file.

The sidecar check compares the facts recorded beside an engine with the machine's: engines and timing
caches are tied to the GPU architecture and the TensorRT version, so engines are built on the target.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from pydantic import ConfigDict, field_validator

from edgekit.errors import EdgekitError
from edgekit.options import StageConfig, option

DEFAULT_BATCH = (1, 1, 32)  # verify's default batch size is 32: the gate must fit the engine
DEFAULT_SEQ = (1, 128, 512)
MIN_TENSORRT_MAJOR = 10
ENGINE_NAME = "model.engine"
SIDECAR_NAME = "model.engine.json"
SIDECAR_SCHEMA = 1
# Ops of ONNX Runtime's quantizers that TensorRT's ONNX parser cannot import: "N" in onnx-tensorrt's
# docs/operators.md (MatMulInteger, DynamicQuantizeLinear, ConvInteger, QLinearMatMul, QLinearConv), or
# com.microsoft contrib ops, which have no importer at all.
TENSORRT_UNPARSABLE_OPS = frozenset({
    "MatMulInteger", "DynamicQuantizeLinear", "ConvInteger", "QLinearMatMul", "QLinearConv",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention", "QGemm"})
AUTOCAST_HINT = ("convert the ONNX to FP16 first (python -m modelopt.onnx.autocast --onnx_path model.onnx "
                 "--output_path model_fp16.onnx, from nvidia-modelopt) and build that, or drop --fp16")


@dataclass(frozen=True)
class OnnxInput:
    name: str
    shape: tuple  # an int for a fixed dimension, a str (dim_param) or None for a dynamic one


class EngineOptions(StageConfig):
    """How an engine is built: the options of ``engine build``/``engine plan`` and of bench's TensorRT builds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    fp16: bool = option(False, "FP16: the builder flag on TensorRT 10; on 11 the ONNX must carry FP16 types.")
    batch: Optional[tuple[int, int, int]] = option(  # (min, opt, max) of the batch axis
        None, "Batch range MIN,OPT,MAX of the engine's profile (default 1,1,32).", metavar="MIN,OPT,MAX")
    seq: Optional[tuple[int, int, int]] = option(  # (min, opt, max) of the sequence axis
        None, "Sequence range MIN,OPT,MAX (default 1,128,512, capped at the model's positions).", metavar="MIN,OPT,MAX")
    # or whole shapes per input, trtexec-style
    min_shapes: Optional[dict[str, tuple[int, ...]]] = option(
        None, "Whole shapes instead: input_ids:1x1,attention_mask:1x1 (with opt and max).", metavar="SHAPES")
    opt_shapes: Optional[dict[str, tuple[int, ...]]] = option(
        None, "Shapes TensorRT tunes for, e.g. input_ids:1x128.", metavar="SHAPES")
    max_shapes: Optional[dict[str, tuple[int, ...]]] = option(
        None, "Largest shapes, e.g. input_ids:32x512.", metavar="SHAPES")
    # the model's position limit (config.json): caps the default range
    max_positions: Optional[int] = option(None, "The model's position limit.", cli=False)
    # None: TensorRT's default (the device memory); checked by plan_build, which names the option
    workspace_mb: Optional[int] = option(None, "Builder workspace limit in MiB (default: TensorRT's).")
    timing_cache: Optional[str] = option(
        None, "Timing cache file (default: one per TensorRT version and GPU under ~/.cache/edgekit).", path=True)
    use_timing_cache: bool = option(True, "Build with a timing cache (--no-timing-cache: without).",
                                    flag="--timing-cache-on/--no-timing-cache")

    @field_validator("batch", "seq", mode="before")
    @classmethod
    def _range(cls, v, info):
        return parse_range(v, info.field_name) if isinstance(v, str) else v

    @field_validator("min_shapes", "opt_shapes", "max_shapes", mode="before")
    @classmethod
    def _shapes(cls, v, info):
        return parse_shapes(v, info.field_name.replace("_", "-")) if isinstance(v, str) else v


@dataclass
class BuildPlan:
    tensorrt: str
    major: int
    profiles: dict  # input name -> [min, opt, max] shapes; empty when every input is static
    strongly_typed: bool
    fp16_flag: bool
    workspace_bytes: int | None
    timing_cache: str | None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def tensorrt_major(version: str) -> int:
    match = re.match(r"\s*(\d+)", str(version))
    if not match:
        raise EdgekitError(f"cannot read the TensorRT version '{version}'", "pass a version like 10.3.0")
    return int(match.group(1))


def parse_range(text: str, what: str) -> tuple[int, int, int]:
    """'1,8,32' -> (1, 8, 32); a single number means a fixed size."""
    try:
        values = tuple(int(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 3
    if len(values) != 3:
        raise EdgekitError(f"--{what} '{text}' is not MIN,OPT,MAX", f"write it like --{what} 1,8,32")
    return values  # type: ignore[return-value]


def parse_shapes(text: str, what: str) -> dict[str, tuple[int, ...]]:
    """trtexec syntax: 'input_ids:1x128,attention_mask:1x128' -> {name: (1, 128)}."""
    shapes = {}
    for item in (p.strip() for p in str(text).split(",") if p.strip()):
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape:
            raise EdgekitError(f"--{what} '{item}' is not NAME:DxD", f"write it like --{what} input_ids:1x128")
        shapes[name] = shape
    if not shapes:
        raise EdgekitError(f"--{what} is empty", f"write it like --{what} input_ids:1x128")
    return shapes


def _check_range(rng, what: str) -> tuple[int, int, int]:
    lo, opt, hi = rng
    if not (1 <= lo <= opt <= hi):
        raise EdgekitError(f"the {what} range {lo},{opt},{hi} is not 1 <= MIN <= OPT <= MAX",
                           f"pass --{what} MIN,OPT,MAX in increasing order")
    return lo, opt, hi


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _explicit_profiles(inputs: list[OnnxInput], opts: EngineOptions) -> dict:
    given = {"min": opts.min_shapes, "opt": opts.opt_shapes, "max": opts.max_shapes}
    if any(v is None for v in given.values()):
        raise EdgekitError("--min-shapes, --opt-shapes and --max-shapes go together",
                           "pass all three, or none and use --batch/--seq")
    if opts.batch or opts.seq:
        raise EdgekitError("whole shapes and --batch/--seq both set the profile", "pass only one of them")
    known = {i.name: i for i in inputs}
    for kind, shapes in given.items():
        unknown = sorted(set(shapes) - set(known))
        if unknown:
            raise EdgekitError(f"--{kind}-shapes names {', '.join(unknown)}, which the model does not take",
                               f"its inputs are {', '.join(known)}")
    profiles = {}
    for inp in inputs:
        if all(isinstance(d, int) for d in inp.shape) and not any(inp.name in s for s in given.values()):
            continue  # static input: nothing to plan
        missing = [k for k, s in given.items() if inp.name not in s]
        if missing:
            raise EdgekitError(f"input {inp.name} has dynamic dimensions but no --{missing[0]}-shapes entry",
                               f"add {inp.name}:{_dims(d if isinstance(d, int) else 1 for d in inp.shape)} to it")
        triple = [tuple(given[k][inp.name]) for k in ("min", "opt", "max")]
        for shape in triple:
            if len(shape) != len(inp.shape):
                raise EdgekitError(f"the shape {_dims(shape)} for {inp.name} has {len(shape)} dimensions, "
                                   f"the model's input has {len(inp.shape)}", "give one size per dimension")
            for d, want in zip(shape, inp.shape):
                if d < 1 or (isinstance(want, int) and d != want):
                    raise EdgekitError(f"the shape {_dims(shape)} for {inp.name} does not match the model's "
                                       f"{_dims(inp.shape)}", "keep fixed dimensions as they are, and every size >= 1")
        if any(not (a <= b <= c) for a, b, c in zip(*triple)):
            raise EdgekitError(f"the shapes for {inp.name} are not MIN <= OPT <= MAX in every dimension "
                               f"({' / '.join(_dims(s) for s in triple)})", "order them min, opt, max")
        profiles[inp.name] = [list(s) for s in triple]
    return profiles


def _axis_profiles(inputs: list[OnnxInput], opts: EngineOptions) -> dict:
    batch = _check_range(opts.batch or DEFAULT_BATCH, "batch")
    limit = opts.max_positions
    if opts.seq is not None:
        seq = _check_range(opts.seq, "seq")
        if limit and seq[2] > limit:
            raise EdgekitError(f"the sequence range reaches {seq[2]}, beyond the model's {limit} positions",
                               f"use --seq with a maximum of {limit} or less")
    else:
        hi = min(DEFAULT_SEQ[2], limit or DEFAULT_SEQ[2])
        seq = (1, min(DEFAULT_SEQ[1], hi), hi)
    profiles = {}
    for inp in inputs:
        dynamic = [not isinstance(d, int) for d in inp.shape]
        if not any(dynamic):
            continue
        if len(inp.shape) != 2:
            raise EdgekitError(f"input {inp.name} has shape {_dims(d if isinstance(d, int) else '?' for d in inp.shape)}, "
                               "which is not [batch, sequence]",
                               "give its shapes with --min-shapes/--opt-shapes/--max-shapes")
        triple = [[inp.shape[0] if not dynamic[0] else batch[k], inp.shape[1] if not dynamic[1] else seq[k]]
                  for k in range(3)]
        profiles[inp.name] = triple
    return profiles


def check_parsable(op_types) -> None:
    """Refuse an ONNX with ops TensorRT's parser cannot import, before TensorRT fails at parse."""
    found = sorted(set(op_types) & TENSORRT_UNPARSABLE_OPS)
    if found:
        raise EdgekitError(f"the ONNX is quantized for ONNX Runtime ({', '.join(found)}), which TensorRT's ONNX "
                           "parser cannot read", "quantize it with edgekit quantize --mode static "
                           "--symmetric-activations (Q/DQ nodes, which TensorRT builds as INT8) instead")


def plan_build(onnx_inputs, options: EngineOptions | None, trt_version: str, *, has_qdq: bool = False,
               has_fp16: bool = False, asymmetric_qdq: int = 0, op_types=()) -> BuildPlan:
    """Decide how to build an engine; raise EdgekitError for anything TensorRT would refuse or misbuild."""
    opts = options or EngineOptions()
    inputs = [i if isinstance(i, OnnxInput) else OnnxInput(i[0], tuple(i[1])) for i in onnx_inputs]
    major = tensorrt_major(trt_version)
    if major < MIN_TENSORRT_MAJOR:
        raise EdgekitError(f"TensorRT {trt_version} is older than {MIN_TENSORRT_MAJOR}; edgekit builds INT8 as "
                           "explicit Q/DQ in strongly typed networks, which needs TensorRT 10 or newer",
                           "on a Jetson use JetPack 6.1 or newer (TensorRT 10.3); elsewhere pip install 'edgekit-transformers[tensorrt]'")
    check_parsable(op_types)
    if has_qdq and asymmetric_qdq:
        raise EdgekitError(f"the ONNX has {asymmetric_qdq} Q/DQ node(s) with a non-zero zero point, and TensorRT "
                           "only takes symmetric INT8", "quantize again with symmetric activations "
                           "(QuantizeConfig(mode='static', symmetric_activations=True))")
    explicit = any(s is not None for s in (opts.min_shapes, opts.opt_shapes, opts.max_shapes))
    profiles = _explicit_profiles(inputs, opts) if explicit else _axis_profiles(inputs, opts)
    notes = []
    # FP16 tensors need strong typing on 10 too: weakly typed without the FP16 flag, 10.x before 10.12 runs
    # them in FP32 while the model says FP16 (and a strongly typed network refuses the flag).
    strongly_typed = has_qdq or has_fp16 or major >= 11
    if has_qdq:
        notes.append("Q/DQ nodes found: strongly typed network, INT8 exactly where the ONNX quantizes "
                     "(explicit quantization; implicit INT8 calibration is deprecated in 10.1 and gone in 11)")
    if has_fp16:
        notes.append("FP16 tensors found: strongly typed network, so they run in FP16 as the ONNX types them"
                     + ("" if major >= 11 else " (weakly typed without the FP16 flag, TensorRT 10 before 10.12 "
                                               "would run them in FP32)"))
    if major >= 11 and not (has_qdq or has_fp16):
        notes.append("TensorRT 11 networks are always strongly typed: precisions come from the ONNX types")
    fp16_flag = False
    if opts.fp16:
        if major >= 11 and not has_fp16:
            raise EdgekitError(f"TensorRT {trt_version} has no FP16 builder flag: an FP16 engine needs an ONNX "
                               "whose tensors are FP16, and this one has none", AUTOCAST_HINT)
        if has_fp16:
            notes.append("FP16 comes from the ONNX's own FP16 tensors (strong typing), not a builder flag")
        elif has_qdq:
            raise EdgekitError("--fp16 cannot be combined with a Q/DQ (INT8) model on TensorRT 10: its strongly "
                               "typed network refuses precision flags, and building it weakly typed would let "
                               "TensorRT choose precisions behind the Q/DQ scales",
                               "drop --fp16: the layers the ONNX leaves in float then run in FP32")
        else:
            fp16_flag = True
            notes.append("FP16 builder flag: TensorRT may choose FP16 kernels layer by layer (weakly typed)")
    if opts.workspace_mb is not None and opts.workspace_mb < 1:
        raise EdgekitError("--workspace-mb must be at least 1", "pass a size in MiB, or leave it unset")
    return BuildPlan(
        tensorrt=str(trt_version), major=major, profiles=profiles, strongly_typed=strongly_typed,
        fp16_flag=fp16_flag, workspace_bytes=opts.workspace_mb * 1024**2 if opts.workspace_mb else None,
        timing_cache=opts.timing_cache if opts.use_timing_cache else None, notes=notes)


# ---- the sidecar check: was this engine built for this machine? -------------------------------------


def _release(version) -> tuple:
    """'10.3.0.30' -> (10, 3, 0): the build number does not change the engine format."""
    return tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])


def engine_build_command(sidecar: dict, engine_dir: str = "ENGINE_DIR") -> str:
    """The command that rebuilds an engine with the options recorded in its sidecar."""
    opts = sidecar.get("options") or {}
    words = ["edgekit", "engine", "build", sidecar.get("source_onnx") or "MODEL_ONNX_DIR", "-o", engine_dir, "--overwrite"]
    if opts.get("fp16"):
        words.append("--fp16")
    for key in ("batch", "seq"):
        if opts.get(key):
            words += [f"--{key}", ",".join(str(v) for v in opts[key])]
    for key in ("min_shapes", "opt_shapes", "max_shapes"):
        if opts.get(key):
            words += [f"--{key.replace('_', '-')}", ",".join(f"{k}:{_dims(v)}" for k, v in opts[key].items())]
    return " ".join(words)


def check_sidecar(sidecar: dict | None, machine: dict, engine: str = "the engine",
                  engine_dir: str = "ENGINE_DIR") -> list[str]:
    """Raise EdgekitError when the engine was built for another TensorRT or GPU; return softer warnings.

    ``sidecar`` is model.engine.json; ``machine`` has the same keys as its ``built_with`` block.
    """
    rebuild = f"TensorRT engines only run where they were built: rebuild it on this machine with: " \
              f"{engine_build_command(sidecar or {}, engine_dir)}"
    if not sidecar or "built_with" not in sidecar:
        raise EdgekitError(f"{engine} has no {SIDECAR_NAME} saying which TensorRT and GPU built it", rebuild)
    built = sidecar["built_with"]
    problems = []
    if _release(built.get("tensorrt")) != _release(machine.get("tensorrt")):
        problems.append(f"TensorRT {built.get('tensorrt')} (this machine has {machine.get('tensorrt')})")
    if str(built.get("compute_capability")) != str(machine.get("compute_capability")):
        problems.append(f"a GPU of compute capability {built.get('compute_capability')} ({built.get('gpu_name')}; "
                        f"this one is {machine.get('compute_capability')}, {machine.get('gpu_name')})")
    if problems:
        raise EdgekitError(f"{engine} was built with {' and for '.join(problems)}", rebuild)
    warnings = []
    if built.get("gpu_name") != machine.get("gpu_name"):
        warnings.append(f"{engine} was built on a {built.get('gpu_name')} and runs on a {machine.get('gpu_name')} "
                        "of the same architecture: it works, but was not tuned for this GPU")
    if built.get("jetpack") != machine.get("jetpack"):
        warnings.append(f"{engine} was built under JetPack {built.get('jetpack')}, this machine runs "
                        f"{machine.get('jetpack')}")
    return warnings
