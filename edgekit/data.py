"""Evaluation and calibration data: TSV/CSV/JSONL/Parquet -> examples -> tokenized numpy batches.

TSV is read with quoting disabled by default, as GLUE does (SST-2 sentences hold bare quote characters).
The stdlib csv/json readers are used instead of pandas so that quoting and encoding errors stay under our
control and the dependency set stays small; Parquet goes through pyarrow.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgekit.errors import EdgekitError
from edgekit.tasks import Task

TEXT_COLUMNS = ("text", "sentence", "sentence1", "content", "review", "query")
TOKEN_COLUMNS = ("tokens", "words")
LABEL_COLUMNS = ("label", "labels", "tags", "ner_tags")
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass
class Examples:
    texts: list  # list[str], or list[list[str]] (words) for token-classification
    labels: list | None  # class ids, or per-word tag ids; None when the data has no labels
    text_column: str
    label_column: str | None
    source: str
    # A label column given or found that the task has no use for (feature-extraction): said, not read.
    unused_label_column: str | None = None

    def __len__(self) -> int:
        return len(self.texts)


def _rows(path: Path, fmt: str, tsv_quoting: bool) -> tuple[list[str], list[dict[str, Any]]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several unrelated types for a damaged file
            raise EdgekitError(f"{path} is not a readable Parquet file ({e})", "check the file") from None
        return table.column_names, table.to_pylist()
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if fmt == "jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise EdgekitError(f"line {n} of {path} is not valid JSON ({e.msg})", "fix or remove that line") from None
                columns = list(dict.fromkeys(k for r in rows[:100] for k in r))
                return columns, rows
            if fmt == "tsv":
                reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL if tsv_quoting else csv.QUOTE_NONE)
            else:
                reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except UnicodeDecodeError as e:
        raise EdgekitError(
            f"{path} is not UTF-8 text (invalid byte at offset {e.start})", "re-encode it as UTF-8, e.g. iconv -t UTF-8"
        ) from None
    except csv.Error as e:
        raise EdgekitError(f"{path} could not be parsed as {fmt.upper()} ({e})", "check its delimiter and quoting") from None


def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, path: Path, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise EdgekitError(
                f"column '{wanted}' is not in {path.name}; its columns are: {', '.join(columns) or '(none)'}",
                f"pass --{what}-column with one of them",
            )
        return wanted
    found = next((c for c in defaults if c in columns), None)
    if found is None and required:
        raise EdgekitError(
            f"{path.name} has no {what} column (looked for {', '.join(defaults)}); its columns are: {', '.join(columns) or '(none)'}",
            f"pass --{what}-column NAME",
        )
    return found


def _label_id(value: Any, label2id: dict[str, int], id2label: dict[int, str], where: str) -> int:
    if isinstance(value, str):
        v = value.strip()
        if v in label2id:
            return label2id[v]
        lowered = {k.lower(): i for k, i in label2id.items()}
        if v.lower() in lowered:
            return lowered[v.lower()]
        if v.lstrip("-").isdigit():
            value = int(v)
        else:
            raise EdgekitError(
                f"label '{v}' ({where}) is not one of the model's labels: {', '.join(map(str, id2label.values()))}",
                "map the labels to the checkpoint's id2label names or ids",
            )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise EdgekitError(f"label {value!r} ({where}) is neither a label name nor an integer id", "fix the label column")
    if id2label and int(value) not in id2label:
        raise EdgekitError(
            f"label id {int(value)} ({where}) is not in the model's id2label ({', '.join(map(str, sorted(id2label)))})",
            "check that the data matches this checkpoint",
        )
    return int(value)


def load_examples(path, task: Task, text_column: str | None = None, label_column: str | None = None,
                  id2label: dict[int, str] | None = None, limit: int | None = None, tsv_quoting: bool = False,
                  use_labels: bool = True, flag: str = "--data") -> Examples:
    """Read examples for ``task``; labels are mapped through the checkpoint's ``id2label``."""
    p = Path(path)
    if not p.exists():
        raise EdgekitError(f"the data file {p} does not exist", f"check the path given with {flag}")
    if p.is_dir():
        raise EdgekitError(f"the data path {p} is a folder", "give a .tsv, .csv, .jsonl or .parquet file")
    fmt = FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise EdgekitError(f"{p.name} has an unknown data format '{p.suffix}'", f"use one of {', '.join(FORMATS)}")
    if p.stat().st_size == 0:
        raise EdgekitError(f"the data file {p} is empty", "give a file with a header and at least one example")
    columns, rows = _rows(p, fmt, tsv_quoting)
    if not rows:
        raise EdgekitError(f"the data file {p} has no examples (only a header)", "give a file with at least one example")
    tokens = task.name == "token-classification"
    tcol = _pick(columns, text_column, TOKEN_COLUMNS + TEXT_COLUMNS if tokens else TEXT_COLUMNS, "text", p, True)
    lcol = _pick(columns, label_column, LABEL_COLUMNS, "label", p, False) if use_labels and task.labeled_metric else None
    unused = None
    if use_labels and not task.labeled_metric:
        unused = label_column or next((c for c in LABEL_COLUMNS if c in columns), None)
    if limit:
        rows = rows[:limit]
    id2label = id2label or {}
    label2id = {v: k for k, v in id2label.items()}
    texts, labels = [], [] if lcol else None
    for i, row in enumerate(rows):
        where = f"row {i + 1} of {p.name}"
        text = row.get(tcol)
        if tokens:
            words = text if isinstance(text, list) else str(text or "").split()
            if not words:
                raise EdgekitError(f"{where} has no words in column '{tcol}'", "remove empty rows")
            texts.append([str(w) for w in words])
            if lcol:
                tags = row.get(lcol)
                tags = tags if isinstance(tags, list) else str(tags or "").split()
                if len(tags) != len(words):
                    raise EdgekitError(f"{where} has {len(words)} words but {len(tags)} tags", "give one tag per word")
                labels.append([_label_id(t, label2id, id2label, where) for t in tags])
        else:
            if text is None or (isinstance(text, str) and not text.strip()):
                raise EdgekitError(f"{where} has an empty '{tcol}'", "remove empty rows or choose another --text-column")
            texts.append(str(text))
            if lcol:
                labels.append(_label_id(row.get(lcol), label2id, id2label, where))
    return Examples(texts, labels, tcol, lcol, str(p), unused)


def encode(tokenizer, texts: list, max_length: int = 128, words: bool = False):
    """Tokenize a list of texts (or word lists) to int64 numpy arrays, padded to the longest."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, is_split_into_words=words,
                    return_tensors="np")
    arrays = {k: v.astype("int64") for k, v in enc.items()}
    word_ids = [enc.word_ids(i) for i in range(len(texts))] if words else None
    return arrays, word_ids


def first_subtokens(word_ids: list) -> list[int]:
    """Positions of each word's first sub-token: where token-classification predicts, and is scored."""
    return [j for j, w in enumerate(word_ids) if w is not None and (j == 0 or word_ids[j - 1] != w)]


def batches(tokenizer, examples: Examples, batch_size: int = 32, max_length: int = 128) -> Iterator[tuple[dict, list | None, slice]]:
    words = examples.texts and isinstance(examples.texts[0], list)
    for start in range(0, len(examples), batch_size):
        sl = slice(start, min(start + batch_size, len(examples)))
        arrays, word_ids = encode(tokenizer, examples.texts[sl], max_length, bool(words))
        yield arrays, word_ids, sl


def synthetic_inputs(input_names: list[str], vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    out = {"input_ids": rng.integers(5, max(6, vocab_size), size=(batch, seq), dtype=np.int64)}
    if "attention_mask" in input_names:
        out["attention_mask"] = np.ones((batch, seq), dtype=np.int64)
    if "token_type_ids" in input_names:
        out["token_type_ids"] = np.zeros((batch, seq), dtype=np.int64)
    return out
