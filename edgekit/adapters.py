"""LoRA / PEFT adapter folders: merged into their base model with peft before any stage sees them.

A folder with ``adapter_config.json`` and no ``config.json`` is an adapter. Its base is the folder named by
``base_model_name_or_path`` when that is a local folder, or ``--base FOLDER``; the base is opened with the same
rules as any checkpoint (no code from it runs). ``peft``'s ``merge_and_unload`` folds the low-rank update into
the weights, and the merged model is saved in scratch space for this process (the adapter folder is never
written to); the hashes of the adapter and of the merged weights are recorded with it.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from edgekit.errors import EdgekitError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_merged: dict = {}  # (adapter, base) -> (merged folder, record): one merge per process


def is_adapter(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def _base_of(adapter: Path, base) -> Path:
    try:
        cfg = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"{adapter / ADAPTER_CONFIG} is not valid JSON ({e})", "restore the adapter folder") from None
    if base is not None:
        b = Path(base)
        if not b.is_dir():
            raise EdgekitError(f"the --base folder {b} does not exist", "point --base at the base model's checkpoint folder")
        return b
    recorded = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not recorded:
        raise EdgekitError(f"{adapter} names no base model", "pass --base FOLDER (the checkpoint the adapter was trained on)")
    b = Path(recorded)
    if not b.is_absolute():
        b = (adapter / b) if (adapter / b).is_dir() else b
    if not b.is_dir():
        raise EdgekitError(f"the adapter's base model '{recorded}' is not a local folder (edgekit downloads nothing)",
                           "pass --base FOLDER (the checkpoint the adapter was trained on)")
    return b


def merge_adapter(adapter: Path, base, load_base, tokenizer_files: tuple):
    """(merged checkpoint folder, record) for an adapter folder. ``load_base(path)`` opens and loads the base
    model (edgekit.checkpoint's rules: this module does not import it, it imports this one)."""
    from edgekit.artifacts import tree_sha256

    adapter = adapter.resolve()
    if not any((adapter / w).is_file() for w in ADAPTER_WEIGHTS):
        raise EdgekitError(f"{adapter} has {ADAPTER_CONFIG} but no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})",
                           "save the adapter with save_pretrained()")
    base_path = _base_of(adapter, base).resolve()
    key = (str(adapter), str(base_path))
    if key in _merged:
        return _merged[key]
    model = load_base(base_path)
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        raise EdgekitError(f"the adapter {adapter} does not fit the base model {base_path} ({str(e).splitlines()[0][:160]})",
                           "pass --base the checkpoint the adapter was trained on") from None
    out = Path(tempfile.mkdtemp(prefix="edgekit-merged-"))
    atexit.register(shutil.rmtree, out, True)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer_from = adapter if any((adapter / t).is_file() for t in tokenizer_files) else base_path
    for f in tokenizer_from.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) or f.name in tokenizer_files):
            shutil.copy(f, out / f.name)
    record = {"adapter": str(adapter), "adapter_sha256": tree_sha256(adapter)[0], "base": str(base_path),
              "base_sha256": tree_sha256(base_path)[0], "merged_sha256": tree_sha256(out)[0], "merged_with": "peft"}
    (out / "edgekit_adapter.json").write_text(json.dumps(record, indent=2))
    _merged[key] = (out, record)
    return out, record
