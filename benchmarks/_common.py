"""What the benchmark scripts share: the cache folder and the options every script takes."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def cache_root() -> Path:
    """Where scripts keep trained models and exports between runs ($EDGEKIT_CACHE, else ~/.cache/edgekit)."""
    return Path(os.environ.get("EDGEKIT_CACHE", Path.home() / ".cache" / "edgekit"))


def add_common_args(ap: argparse.ArgumentParser, work: str) -> None:
    """--threads (default: every usable core) and --work (default: a folder of the cache)."""
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--work", type=Path, default=cache_root() / work)


def edgekit(*args, check: bool = False):
    """`python -m edgekit ARGS` in a subprocess, output captured; with ``check``, a failure ends the script with
    the command's stderr."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "edgekit", *map(str, args)], capture_output=True, text=True)
    if check and r.returncode != 0:
        sys.exit(f"edgekit {args[0]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return r


def genai_builder_int4(ckpt: Path, out: Path, log: Path) -> Path | None:
    """The peer INT4: onnxruntime-genai's model builder (`-p int4 -e cpu`, int4_accuracy_level=4) on the same
    checkpoint, or None when onnxruntime-genai is not installed (`pip install onnxruntime-genai==0.11.4`: its
    0.18 builder needs transformers >= 5, optimum-onnx 0.1.0 needs < 4.58). The folder gets the checkpoint's
    config.json, so that edgekit reads its context length; the graph is run by edgekit's own decode loop."""
    import importlib.util
    import shutil
    import subprocess
    import sys

    if importlib.util.find_spec("onnxruntime_genai") is None:
        return None
    if (out / "model.onnx").is_file():
        if not (out / "config.json").is_file():
            shutil.copy(ckpt / "config.json", out / "config.json")
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o", str(tmp),
                        "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai-cache"),
                        "--extra_options", "int4_accuracy_level=4"], check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    shutil.copy(ckpt / "config.json", tmp / "config.json")
    tmp.rename(out)
    return out


def edgekit_int4_on_genai(api, ckpt: Path, work: Path, name: str = "int4-genai", **quantize) -> Path:
    """edgekit's INT4 on the builder's FP32 graph (`export --exporter genai`, then `quantize --bits 4` with the
    ``quantize`` options), cached under ``work / name``."""
    fp32, int4 = work / "onnx-genai", work / name
    if not (fp32 / "model.onnx").is_file():
        api.export(ckpt, fp32, api.ExportConfig(atol=1e-3, exporter="genai"))
    if not (int4 / "model.onnx").is_file():
        api.quantize(fp32, int4, api.QuantizeConfig(bits=4, **quantize))
    return int4


def optimum_export(ckpt: Path, out: Path) -> Path:
    """Optimum's own export (`text-generation-with-past`, optimum-onnx's `main_export`, not edgekit's): the graph
    the peer INT8 is quantized from, so that the peer runs as Optimum writes it (every position's logits in a
    prefill; edgekit's exports add the optional `logits_to_keep`)."""
    import shutil

    if (out / "model.onnx").is_file():
        return out
    from optimum.exporters.onnx import main_export

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    main_export(str(ckpt), tmp, task="text-generation-with-past", do_validation=False, local_files_only=True)
    tmp.rename(out)
    return out
