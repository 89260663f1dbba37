"""Reading a fine-tuned Hugging Face checkpoint folder, with every failure named for the user."""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.tasks import Task, check_family, detect_task

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict
    task: Task
    model_type: str

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in (self.config.get("id2label") or {}).items()}


def require_path(path, what: str = "path") -> Path:
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"the {what} {p} does not exist", "check the spelling, or give an absolute path")
    return p


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EdgekitError(
            f"{path} has no config.json, so it is not a Hugging Face checkpoint folder",
            "point at the folder written by save_pretrained()",
        )
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{cfg} is not valid JSON ({e})", "restore it from the original checkpoint") from None


def _check_safetensors(f: Path) -> None:
    # A truncated download still has a readable header; compare the size the header promises with the file.
    size = f.stat().st_size
    with open(f, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise _truncated(f)
        (n,) = struct.unpack("<Q", raw)
        if n > size:
            raise _truncated(f)
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _truncated(f) from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if size < 8 + n + end:
        raise _truncated(f)


def _truncated(f: Path) -> EdgekitError:
    return EdgekitError(f"the weights file {f} is truncated or corrupt", "copy or download the checkpoint again")


def check_weights(path: Path) -> Path:
    found = [path / w for w in WEIGHT_FILES if (path / w).is_file()]
    if not found:
        raise EdgekitError(
            f"{path} has config.json but no weights ({' or '.join(WEIGHT_FILES[:2])})",
            "copy the weights into the folder, or save the model again with save_pretrained()",
        )
    weights = found[0]
    if weights.name == "model.safetensors":
        _check_safetensors(weights)
    elif weights.name == "pytorch_model.bin":
        try:
            with zipfile.ZipFile(weights) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError):
            raise _truncated(weights) from None
    else:
        index = json.loads(weights.read_text())
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (path / shard).is_file():
                raise EdgekitError(f"the weight shard {path / shard} is missing", "copy the whole checkpoint folder")
            if shard.endswith(".safetensors"):
                _check_safetensors(path / shard)
    return weights


def open_checkpoint(path, task: str | None = None) -> Checkpoint:
    """Validate a checkpoint folder and detect its task, without importing torch."""
    p = require_path(path, "checkpoint")
    if not p.is_dir():
        raise EdgekitError(f"{p} is a file, but a checkpoint is a folder", "point at the folder holding config.json")
    config = read_config(p)
    model_type = check_family(config)
    t = detect_task(config, task)
    check_weights(p)
    if not any((p / t_).is_file() for t_ in TOKENIZER_FILES):
        raise EdgekitError(
            f"{p} has no tokenizer files", "save the tokenizer beside the model with tokenizer.save_pretrained()"
        )
    return Checkpoint(p.resolve(), config, t, model_type)


def is_checkpoint(path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any((p / w).is_file() for w in WEIGHT_FILES)


PRUNING_FILE = "edgekit_pruning.json"  # written by `edgekit prune`: per-layer kept heads / FFN neurons


def load_model(ckpt: Checkpoint):
    """The torch model for the checkpoint's task, in eval mode, from local files only."""
    import transformers

    if (ckpt.path / PRUNING_FILE).is_file():
        from edgekit.compress.prune import load_pruned_model

        return load_pruned_model(ckpt).eval()

    cls = getattr(transformers, ckpt.task.auto_class)
    try:
        model = cls.from_pretrained(ckpt.path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise EdgekitError(
            f"transformers could not load the weights in {ckpt.path} ({str(e).splitlines()[0]})",
            "check that the checkpoint is complete and matches its config.json",
        ) from None
    return model.eval()


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise EdgekitError(
            f"the tokenizer in {path} could not be loaded ({str(e).splitlines()[0]})",
            "save it again with tokenizer.save_pretrained()",
        ) from None
