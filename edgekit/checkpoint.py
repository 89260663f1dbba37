"""Reading a fine-tuned Hugging Face checkpoint folder, with every failure named for the user."""

from __future__ import annotations

import contextlib
import json
import struct
import zipfile
import dataclasses
from dataclasses import dataclass
from functools import cached_property
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
    trust_remote_code: bool = False  # the user's --trust-remote-code: the folder's own Python may run
    adapter: dict | None = None  # a LoRA/PEFT adapter merged into its base (edgekit.adapters): path is the merge

    @property
    def origin(self) -> Path:
        """The folder the user named: the adapter's for a merged adapter, else ``path``."""
        return Path(self.adapter["adapter"]) if self.adapter else self.path

    @property
    def id2label(self) -> dict[int, str]:
        return {int(k): v for k, v in (self.config.get("id2label") or {}).items()}

    @cached_property
    def tokenizer(self):
        """The checkpoint's tokenizer, loaded once per opened checkpoint (every stage of a run shares it)."""
        return load_tokenizer(self.path, self.trust_remote_code)


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


def remote_code_file(path: Path, config: dict) -> tuple[Path, str] | None:
    """(file, why) when loading the checkpoint would run Python code shipped inside it, else None.

    transformers runs a folder's own modules when config.json or tokenizer_config.json has an ``auto_map``,
    and a ``tokenizer_class`` it does not know can only come from such code. Asked with
    ``trust_remote_code=None`` it *prompts* ("Do you wish to run the custom code?", after a 15 s wait without
    a terminal); edgekit instead refuses up front unless the user passed --trust-remote-code.
    """
    if config.get("auto_map"):
        return path / "config.json", "an auto_map"
    tok_file = path / "tokenizer_config.json"
    if not tok_file.is_file():
        return None
    try:
        tok = json.loads(tok_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not ours to judge here: the tokenizer loader names a broken file
    if not isinstance(tok, dict):
        return None
    if tok.get("auto_map"):
        return tok_file, "an auto_map"
    cls = tok.get("tokenizer_class")
    if isinstance(cls, str) and cls:
        import transformers  # lazy module: only the named tokenizer module is imported, never torch

        if not any(hasattr(transformers, name) for name in (cls, cls.removesuffix("Fast"), f"{cls}Fast")):
            return tok_file, f"the tokenizer class {cls}, which transformers does not have"
    return None


def open_checkpoint(path, task: str | None = None, trust_remote_code: bool = False, base=None) -> Checkpoint:
    """Validate a checkpoint folder and detect its task, without importing torch.

    An already opened ``Checkpoint`` is returned as it is (with another ``task``: the same files, that task),
    so a stage handed the run's checkpoint never reads the folder again. A checkpoint that needs its own
    Python code to load is refused unless ``trust_remote_code`` (the user's --trust-remote-code) is set.
    """
    if isinstance(path, Checkpoint):
        if trust_remote_code and not path.trust_remote_code:
            path = dataclasses.replace(path, trust_remote_code=True)
        if task is None or task == path.task.name:
            return path
        return dataclasses.replace(path, task=detect_task(path.config, task))
    p = require_path(path, "checkpoint")
    if not p.is_dir():
        raise EdgekitError(f"{p} is a file, but a checkpoint is a folder", "point at the folder holding config.json")
    from edgekit.adapters import is_adapter, merge_adapter

    if is_adapter(p):
        merged, record = merge_adapter(p, base, lambda b: load_model(open_checkpoint(b, task, trust_remote_code)),
                                       TOKENIZER_FILES)
        return dataclasses.replace(open_checkpoint(merged, task, trust_remote_code), adapter=record)
    if base is not None:
        raise EdgekitError(f"--base is for LoRA adapter folders, but {p} is a full checkpoint", "drop --base")
    config = read_config(p)
    remote = remote_code_file(p, config)
    if remote is not None and not trust_remote_code:
        raise EdgekitError(
            f"{remote[0]} names {remote[1]}, so loading this checkpoint would run Python code shipped inside it, "
            "which edgekit does not do by default",
            "pass --trust-remote-code only if you trust the checkpoint's author",
        )
    t = detect_task(config, task)
    model_type = check_family(config, t)
    check_weights(p)
    if not any((p / t_).is_file() for t_ in TOKENIZER_FILES):
        raise EdgekitError(
            f"{p} has no tokenizer files", "save the tokenizer beside the model with tokenizer.save_pretrained()"
        )
    return Checkpoint(p.resolve(), config, t, model_type, trust_remote_code)


PRUNING_FILE = "edgekit_pruning.json"  # written by `edgekit prune`: per-layer kept heads / FFN neurons
PRUNING_FORMAT = "edgekit-pruned-encoder"
# Of the PRUNING_FILE format: written by prune, checked by read_pruning_spec. 2 added "kept_layers" (the original
# index of each layer; whole layers may be removed); a version 1 file kept every layer.
PRUNING_SCHEMA_VERSION = 2


def load_model(ckpt: Checkpoint):
    """The torch model for the checkpoint's task, in eval mode, from local files only."""
    import transformers

    if (ckpt.path / PRUNING_FILE).is_file():
        return load_pruned_model(ckpt).eval()

    cls = getattr(transformers, ckpt.task.auto_class)
    try:
        model = cls.from_pretrained(ckpt.path, local_files_only=True, trust_remote_code=ckpt.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:
        raise EdgekitError(
            f"transformers could not load the weights in {ckpt.path} ({str(e).splitlines()[0]})",
            "check that the checkpoint is complete and matches its config.json",
        ) from None
    return model.eval()


def load_tokenizer(path, trust_remote_code: bool = False):
    """The tokenizer saved in ``path``. ``trust_remote_code=False`` is explicit: with None transformers
    prompts on a terminal (and stalls 15 s without one) before running the folder's code."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EdgekitError(
            f"the tokenizer in {path} could not be loaded ({str(e).splitlines()[0]})",
            "save it again with tokenizer.save_pretrained()",
        ) from None


# ---- pruned checkpoints (written by edgekit.compress.prune) -------------------------------------------


def read_pruning_spec(path: Path) -> dict:
    f = Path(path) / PRUNING_FILE
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgekitError(f"{f} could not be read ({e})", "prune the original checkpoint again") from None
    if not isinstance(spec, dict) or spec.get("format") != PRUNING_FORMAT or "layers" not in spec:
        raise EdgekitError(f"{f} is not an edgekit pruning record", "prune the original checkpoint again")
    if spec.get("schema_version", 0) > PRUNING_SCHEMA_VERSION:
        raise EdgekitError(f"{f} was written by a newer edgekit (schema {spec['schema_version']})",
                           "upgrade edgekit to load this checkpoint")
    spec.setdefault("kept_layers", list(range(len(spec["layers"]))))
    return spec


def load_pruned_model(ckpt: Checkpoint):
    """Rebuild a pruned checkpoint: the model class from config (its layer count is the kept layers'; transformers
    prunes the heads natively from ``config.pruned_heads`` while building it), FFN modules resized from
    edgekit_pruning.json, then the safetensors state dict loaded strictly (every key present, every shape equal)."""
    import transformers
    from safetensors.torch import load_file

    from edgekit.compress.prune_arch import get_arch, quiet_empty_init, shape_like_pruned

    spec = read_pruning_spec(ckpt.path)
    arch = get_arch(ckpt.model_type)
    config = transformers.AutoConfig.from_pretrained(ckpt.path, local_files_only=True,
                                                     trust_remote_code=ckpt.trust_remote_code)
    heads = getattr(config, arch.n_heads)
    if not getattr(config, arch.n_layers) == len(spec["layers"]) == len(spec["kept_layers"]):
        raise EdgekitError(f"config.json's {arch.n_layers} ({getattr(config, arch.n_layers)}) disagrees with the "
                           f"{len(spec['layers'])} layers of {PRUNING_FILE} in {ckpt.path}",
                           "restore both files from the pruned output, or prune again")
    pruned_heads = {int(k): set(v) for k, v in (config.pruned_heads or {}).items()}
    for i, layer in enumerate(spec["layers"]):
        if pruned_heads.get(i, set()) != set(range(heads)) - set(layer["heads_kept"]):
            raise EdgekitError(f"config.json's pruned_heads disagrees with {PRUNING_FILE} in {ckpt.path} (layer {i})",
                               "restore both files from the pruned output, or prune again")
    weights = ckpt.path / "model.safetensors"
    if not weights.is_file():
        raise EdgekitError(f"the pruned checkpoint {ckpt.path} has no model.safetensors",
                           "save it with safe_serialization=True, or prune again")
    cls = getattr(transformers, spec["auto_class"], None)
    if cls is None:
        raise EdgekitError(f"this transformers has no class {spec['auto_class']}", "install the version that pruned it")
    try:
        from transformers.modeling_utils import no_init_weights  # skip random init: every weight is loaded next
    except ImportError:  # pragma: no cover - older/newer transformers
        no_init_weights = contextlib.nullcontext
    with no_init_weights(), quiet_empty_init():
        model = cls._from_config(config)
    shape_like_pruned(model, arch, spec["layers"])
    try:
        model.load_state_dict(load_file(weights), strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])[:300]
        raise EdgekitError(f"the weights in {weights} do not fit the pruned structure ({detail})",
                           "the folder was modified after pruning; prune the original checkpoint again") from None
    if ckpt.task.auto_class == "AutoModel" and spec["auto_class"] != type(model.base_model).__name__:
        model = model.base_model  # --task feature-extraction on a pruned classifier: its encoder alone
    return model.eval()
