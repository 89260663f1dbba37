"""Export stage: HF checkpoint -> ONNX (optimum's exporter), validated against PyTorch.

Unlike ``optimum-cli export onnx``, which only warns on a tolerance breach (optimum#1755), a breach here is
an error (exit 1) and nothing is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from edgekit.version import __version__
from edgekit.artifacts import model_size, scratch_dir, staged_output
from edgekit.errors import CheckFailed, EdgekitError
from edgekit.options import StageConfig, base_option, option, task_option, trust_remote_code_option
from edgekit.progress import Progress
from edgekit.reports import Cell, FAIL, PASS, RenderedReport, SCHEMA_VERSION, Section, fmt_mib
from edgekit.runtimes.base import ARTIFACT_FILE, ONNX_NAME

MIN_OPSET = 17
# The newest opset torch's TorchScript exporter (the one optimum drives) writes: torch 2.x stops at 20
# (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET; a test checks this value against it). Above it
# torch fails after printing its whole IR graph, so the range is checked before anything is exported.
MAX_OPSET = 20


class ExportConfig(StageConfig):
    task: Optional[str] = task_option()
    # optimum recommends 18 for BERT-family encoders; 17 is the floor
    opset: int = option(18, f"ONNX opset ({MIN_OPSET} to {MAX_OPSET}).", between=(MIN_OPSET, MAX_OPSET))
    atol: float = option(1e-4, "Largest allowed |ONNX - PyTorch| (above 0, at most 1).", gt=0, between=(0, 1))
    data: Optional[str] = option(None, "Validate on real examples from this file (synthetic otherwise).", recipe=False,
                                 path=True)
    text_column: Optional[str] = option(None, "Text column of --data.", recipe=False)
    validation_samples: int = option(32, "Examples of --data the export is validated on.", ge=1, recipe=False)
    trust_remote_code: bool = trust_remote_code_option()
    base: Optional[str] = base_option()
    # Decoders: optimum-onnx's text-generation-with-past graph (every family; loads in ORTModelForCausalLM), or
    # onnxruntime-genai's model builder (fused GroupQueryAttention; measured 1.7x the decode speed after INT4 on
    # SmolLM2-135M here; the genai extra, Llama/Qwen/Mistral/Phi/Gemma).
    exporter: Literal["optimum", "genai"] = option(
        "optimum", "text-generation: optimum (optimum-onnx) or genai (onnxruntime-genai's model builder, FP32; "
        "faster graphs, needs the genai extra).")


@dataclass
class ExportReport(RenderedReport):
    source: str
    output: str
    task: str
    opset: int
    max_abs_diff: float
    atol: float
    validation_inputs: str
    shapes_checked: list = field(default_factory=list)
    onnx_bytes: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.atol

    @staticmethod
    def sections_of(d: dict, wide: bool = False) -> list[Section]:
        diff, atol = d.get("max_abs_diff"), d.get("atol")
        within = diff is not None and atol is not None and diff <= atol
        row = [d.get("output"), fmt_mib(d.get("onnx_bytes")),
               Cell("-" if diff is None else f"{diff:.2e}", PASS if within else FAIL),
               "-" if atol is None else f"{atol:.0e}", d.get("validation_inputs")]
        return [Section(f"Export: {d.get('task')}, opset {d.get('opset')}",
                        ["model", "size (MiB)", "max abs diff vs PyTorch", "tolerance", "validated on"], [row],
                        align="lrrrl")]


def _validation_batches(ckpt, tokenizer, input_names, cfg: ExportConfig):
    from edgekit.data import batches, load_examples, max_tokens, synthetic_inputs

    longest = max_tokens(ckpt.config, tokenizer, 128)  # never past the model's own positions
    if cfg.data:
        ex = load_examples(cfg.data, ckpt.task, cfg.text_column, limit=cfg.validation_samples, use_labels=False)
        return ([b for b, _, _ in batches(tokenizer, ex, batch_size=8, max_length=longest)],
                f"{len(ex)} examples from {Path(cfg.data).name}")
    vocab = ckpt.config.get("vocab_size", 1000)
    # different batch and sequence sizes exercise the dynamic axes
    shapes = [(2, min(16, longest)), (3, min(7, longest)), (1, longest)]
    return [synthetic_inputs(input_names, vocab, b, s, seed=i) for i, (b, s) in enumerate(shapes)], "synthetic token ids"


def export_model(ckpt, model, tokenizer, folder: Path, cfg: ExportConfig, progress: Progress,
                 recorded_source: Path | None = None) -> ExportReport:
    """Export a loaded model into ``folder`` (already staged) and validate it. Used by export and prune.

    ``recorded_source`` is the checkpoint's path to record when ``ckpt`` is itself still in a staging folder
    (compress --prune): the metadata must name where the checkpoint will be, not where it is being written.
    """
    import numpy as np
    from optimum.exporters.onnx import onnx_export_from_model

    from edgekit.runtimes.ort_runtime import load_onnxruntime

    from edgekit.tasks import is_decoder

    source = str(recorded_source or ckpt.origin)
    if is_decoder(ckpt.task):
        return _export_decoder(ckpt, model, tokenizer, folder, cfg, progress, source)
    if cfg.opset < MIN_OPSET:
        raise EdgekitError(f"opset {cfg.opset} is too old", f"use --opset {MIN_OPSET} or newer")
    t0 = time.perf_counter()
    with progress.step(f"Exporting to ONNX (opset {cfg.opset})"):
        # no trust_remote_code here: optimum gets the model already loaded (by load_model) and loads nothing
        onnx_export_from_model(model, folder, opset=cfg.opset, task=ckpt.task.name, do_validation=False)
    tokenizer.save_pretrained(folder)
    (folder / ARTIFACT_FILE).write_text(json.dumps({
        "edgekit_version": __version__, "stage": "export", "task": ckpt.task.name, "source": source,
        "opset": cfg.opset,
    }, indent=2))
    session = load_onnxruntime(folder, task=ckpt.task.name)
    from edgekit.runtimes.torch_runtime import TorchSession

    reference = TorchSession("torch-fp32", ckpt.path, ckpt.task.name, session.input_names, ckpt.task.output,
                             info={"model": model})
    worst, shapes = 0.0, []
    val_batches, described = _validation_batches(ckpt, tokenizer, session.input_names, cfg)
    with progress.step("Validating ONNX against PyTorch", total=len(val_batches)) as step:
        for inputs in val_batches:
            diff = float(np.max(np.abs(session.run(inputs) - reference.run(inputs))))
            worst = max(worst, diff)
            shapes.append(list(inputs["input_ids"].shape))
            step.advance()
    report = ExportReport(source, "", ckpt.task.name, cfg.opset, worst, cfg.atol, described, shapes,
                          model_size(folder / ONNX_NAME), time.perf_counter() - t0, cfg.to_dict())
    if not report.passed:
        raise CheckFailed(
            f"the ONNX model differs from PyTorch by {worst:.2e}, above the tolerance {cfg.atol:.0e}; nothing was written",
            "report this model to edgekit, or raise --atol if the difference is acceptable",
        )
    return report


DECODE_STEPS = 4  # decode steps validated after each prefill
DECODER_SHAPES = ((2, 12), (1, 5))  # (batch, prompt tokens) of the validation prefills


def _genai_builder(checkpoint: Path, folder: Path) -> None:
    """onnxruntime-genai's model builder, FP32 for the CPU, into ``folder`` (staged); config.json beside it (the
    builder writes genai_config.json only). Run as a subprocess, as its own CLI: it is a script, not an API."""
    import importlib.util
    import subprocess
    import sys

    from edgekit.errors import MissingExtra

    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise MissingExtra("onnxruntime_genai", "genai")
    with scratch_dir("edgekit-genai-") as tmp:
        r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o",
                            str(folder), "-p", "fp32", "-e", "cpu", "-c", str(tmp)], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if r.returncode != 0:
        last = next((line for line in reversed((r.stderr or r.stdout).splitlines()) if line.strip()), "no output")
        raise EdgekitError(f"onnxruntime-genai's model builder could not export {checkpoint} ({last[:200]})",
                           "use --exporter optimum (every family edgekit supports)")
    shutil.copy(checkpoint / "config.json", folder / "config.json")


def _export_decoder(ckpt, model, tokenizer, folder: Path, cfg: ExportConfig, progress: Progress,
                    source: str) -> ExportReport:
    """A decoder with its KV cache in one graph (prefill and decode; dynamic batch, sequence and past length),
    through optimum-onnx's ``text-generation-with-past`` config, validated on the logits of each prefill and of
    the decode steps after it, each side carrying its own cache."""
    import numpy as np
    from optimum.exporters.onnx import onnx_export_from_model

    from edgekit.runtimes.decoder import OrtDecoder, TorchDecoder, add_logits_to_keep

    t0 = time.perf_counter()
    if cfg.exporter == "genai":
        with progress.step("Exporting to ONNX with a KV cache (onnxruntime-genai's model builder, FP32)"):
            _genai_builder(ckpt.path, folder)
    else:
        with progress.step(f"Exporting to ONNX with a KV cache (opset {cfg.opset})"):
            onnx_export_from_model(model, folder, opset=cfg.opset, task="text-generation-with-past",
                                   do_validation=False)
    logits_to_keep = add_logits_to_keep(folder / ONNX_NAME)
    tokenizer.save_pretrained(folder)
    (folder / ARTIFACT_FILE).write_text(json.dumps({
        "edgekit_version": __version__, "stage": "export", "task": ckpt.task.name, "source": source,
        "opset": cfg.opset, "kv_cache": True, "exporter": cfg.exporter, "logits_to_keep": logits_to_keep,
        **({"adapter": ckpt.adapter} if ckpt.adapter else {}),
    }, indent=2))
    onnx_side, torch_side = OrtDecoder(folder), TorchDecoder(model)
    vocab = int(ckpt.config.get("vocab_size") or onnx_side.vocab_size)
    rng = np.random.default_rng(0)
    worst, shapes = 0.0, []
    with progress.step("Validating ONNX against PyTorch (prefill and decode)", total=len(DECODER_SHAPES)) as step:
        for batch, length in DECODER_SHAPES:
            ids = rng.integers(3, vocab, size=(batch, length), dtype=np.int64)  # clear of the usual special ids
            mask = np.ones_like(ids)
            past = {"onnx": onnx_side.empty_past(batch), "torch": None}
            for k in range(DECODE_STEPS + 1):
                if k == 0:  # the prefill with the last position's logits only (generate's), against the same
                    last, _ = onnx_side.forward(ids, mask, onnx_side.empty_past(batch), last_only=True)
                lo, past["onnx"] = onnx_side.forward(ids, mask, past["onnx"])
                lt, past["torch"] = torch_side.forward(ids, mask, past["torch"])
                worst = max(worst, float(np.max(np.abs(lo - lt))))
                if k == 0:
                    worst = max(worst, float(np.max(np.abs(last[:, -1] - lt[:, -1]))))
                shapes.append([batch, ids.shape[1], mask.shape[1] - ids.shape[1]])  # batch, new tokens, past
                ids = np.argmax(lt[:, -1:], axis=-1).astype(np.int64)  # the original's next token, fed to both
                mask = np.ones((batch, mask.shape[1] + 1), np.int64)
            step.advance()
    described = (f"synthetic token ids: prefills of {' and '.join(f'{b}x{s}' for b, s in DECODER_SHAPES)} tokens, "
                 f"then {DECODE_STEPS} decode steps each through the cache"
                 + ("; each prefill also with logits_to_keep=1 (the last position's logits alone)" if logits_to_keep else ""))
    report = ExportReport(source, "", ckpt.task.name, cfg.opset, worst, cfg.atol, described, shapes,
                          model_size(folder / ONNX_NAME), time.perf_counter() - t0, cfg.to_dict())
    if not report.passed:
        raise CheckFailed(
            f"the ONNX model's logits differ from PyTorch by {worst:.2e} over prefill and decode, above the "
            f"tolerance {cfg.atol:.0e}; nothing was written",
            "report this model to edgekit, or raise --atol if the difference is acceptable",
        )
    return report


def export(checkpoint, output, config: ExportConfig | None = None, overwrite: bool = False,
           progress: Progress | None = None) -> ExportReport:
    """``edgekit export``: checkpoint folder -> self-contained ONNX folder (model, config, tokenizer)."""
    from edgekit.checkpoint import load_model, open_checkpoint

    cfg = config or ExportConfig()
    progress = progress or Progress()
    ckpt = open_checkpoint(checkpoint, cfg.task, cfg.trust_remote_code, cfg.base)
    with staged_output(output, overwrite, protect=(ckpt.path, ckpt.origin)) as staging:
        with progress.step("Loading checkpoint"):
            model = load_model(ckpt)
            tokenizer = ckpt.tokenizer
        report = export_model(ckpt, model, tokenizer, staging, cfg, progress)
        report.output = str(Path(output).resolve())
        for extra in ("edgekit_pruning.json",):
            if (ckpt.path / extra).is_file():
                shutil.copy(ckpt.path / extra, staging / extra)
        report.write(staging / "export_report.json")
    return report
