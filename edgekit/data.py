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
    # How the labels were matched to the model's classes: "names" (id2label names) or "ids"; None: no labels.
    label_mapping: str | None = None

    def __len__(self) -> int:
        return len(self.texts)


def _duplicate(names) -> str | None:
    seen = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


def _no_duplicate_keys(path: Path, n: int):
    """json.loads keeps the last of two equal keys silently; a row that says two things is refused."""
    def hook(pairs):
        dup = _duplicate(k for k, _ in pairs)
        if dup is not None:
            raise EdgekitError(f"line {n} of {path} has the key '{dup}' twice", "keep one value per key")
        return dict(pairs)

    return hook


def _delimited_rows(f, path: Path, fmt: str, tsv_quoting: bool) -> tuple[list[str], list[dict[str, Any]]]:
    """TSV/CSV rows, refusing what the csv module would otherwise take silently: a duplicate column name (the
    last one wins), a row with more fields than the header (the extra ones are dropped) and, in quoted TSV,
    a quote that is not closed on its own line (it swallows the rows after it)."""
    quoted = fmt == "csv" or tsv_quoting
    # strict: a quote closed in the middle of a field, or never closed at all, is an error and not text
    reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",",
                        quoting=csv.QUOTE_MINIMAL if quoted else csv.QUOTE_NONE, strict=quoted)
    fix_quotes = "close the quote, or drop --tsv-quoting" if fmt == "tsv" else "close or escape the quote"
    rows, header, start = [], None, 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            if quoted:  # what strict quoting raises: a quote never closed, or text after a closing one
                raise EdgekitError(f"line {start} of {path} has an unbalanced quote ({e})", fix_quotes) from None
            raise EdgekitError(f"line {start} of {path} could not be parsed as {fmt.upper()} ({e})",
                               "check its delimiter") from None
        if header is None and not record:  # blank lines before the header, as csv.DictReader skips them
            pass
        elif header is None:
            header = record
            if header and header[0].startswith("\ufeff"):
                header[0] = header[0][1:]  # a BOM the encoding did not take (one after a blank line)
            dup = _duplicate(header)
            if dup is not None:
                raise EdgekitError(f"the header (line {start}) of {path} names the column '{dup}' twice",
                                   "give every column its own name")
        elif record:  # a blank line is no row (as csv.DictReader does)
            if fmt == "tsv" and tsv_quoting and reader.line_num > start:
                raise EdgekitError(f"line {start} of {path} opens a quote that is not closed on that line "
                                   f"(the row runs on to line {reader.line_num})", fix_quotes)
            if len(record) > len(header):
                raise EdgekitError(f"line {start} of {path} has {len(record)} fields but the header has {len(header)}",
                                   "remove the extra fields, or quote the text that holds the delimiter"
                                   + (" (with --tsv-quoting)" if fmt == "tsv" and not tsv_quoting else ""))
            rows.append(dict(zip(header, record + [None] * (len(header) - len(record)))))
        start = reader.line_num + 1
    return header or [], rows


def _rows(path: Path, fmt: str, tsv_quoting: bool) -> tuple[list[str], list[dict[str, Any]]]:
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several unrelated types for a damaged file
            raise EdgekitError(f"{path} is not a readable Parquet file ({e})", "check the file") from None
        dup = _duplicate(table.column_names)
        if dup is not None:
            raise EdgekitError(f"{path} has the column '{dup}' twice", "give every column its own name")
        return table.column_names, table.to_pylist()
    try:
        # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
        with open(path, encoding="utf-8-sig", newline="") as f:
            if fmt == "jsonl":
                rows = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line, object_pairs_hook=_no_duplicate_keys(path, n)))
                        except json.JSONDecodeError as e:
                            raise EdgekitError(f"line {n} of {path} is not valid JSON ({e.msg})", "fix or remove that line") from None
                columns = list(dict.fromkeys(k for r in rows[:100] for k in r))
                return columns, rows
            return _delimited_rows(f, path, fmt, tsv_quoting)
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


class _Labels:
    """One rule for the whole file, so that no row is read by name and another by id.

    By name when every label in the file is one of the checkpoint's id2label names (exactly, or ignoring case
    where that is unambiguous); otherwise by integer id, and then a label that is also a name of another class
    (names "1", "2", "3" for ids 0, 1, 2) is ambiguous and refused.
    """

    def __init__(self, id2label: dict[int, str]):
        self.id2label = id2label
        self.by_name = {str(v): k for k, v in id2label.items()}
        lowered: dict[str, set] = {}
        for name, i in self.by_name.items():
            lowered.setdefault(name.lower(), set()).add(i)
        self.by_lower = {k: next(iter(ids)) for k, ids in lowered.items() if len(ids) == 1}
        self.rule: str | None = None

    def _name(self, value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        v = str(value).strip()
        return self.by_name[v] if v in self.by_name else self.by_lower.get(v.lower())

    @staticmethod
    def _id(value: Any) -> int | None:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value.strip())
        if isinstance(value, (int, float)) and not isinstance(value, bool) and int(value) == value:
            return int(value)
        return None

    def choose(self, values: list[tuple[Any, str]]) -> None:
        """Fix the rule from every (label, where) of the file before one is mapped."""
        if not values:
            return
        if self.by_name and all(self._name(v) is not None for v, _ in values):
            self.rule = "names"
            return
        self.rule = "ids"
        names = ", ".join(map(str, self.id2label.values()))
        for v, where in values:  # a label that is neither a name nor an id is the problem to name first
            if self._id(v) is None and self._name(v) is None:
                if isinstance(v, str):
                    raise EdgekitError(f"label '{v.strip()}' ({where}) is not one of the model's labels: {names}",
                                       "map the labels to the checkpoint's id2label names or ids")
                raise EdgekitError(f"label {v!r} ({where}) is neither a label name nor an integer id", "fix the label column")
        for v, where in values:
            i = self._id(v)
            if i is None:
                raise EdgekitError(
                    f"the label column mixes names and ids: '{v}' ({where}) is a name but other labels are "
                    f"not among the model's names ({names})", "write every label as a name, or every label as an id")
            if self.id2label and i not in self.id2label:
                raise EdgekitError(
                    f"label id {i} ({where}) is not in the model's id2label ({', '.join(map(str, sorted(self.id2label)))})",
                    "check that the data matches this checkpoint")
            named = self._name(v)
            if named is not None and named != i:
                raise EdgekitError(
                    f"label '{str(v).strip()}' ({where}) is ambiguous: it is the name of class {named} and the id of "
                    f"class {i} ('{self.id2label[i]}'), and the file's labels are not all names",
                    "write every label as one of the model's names, or rename the classes in config.json's id2label")

    def __call__(self, value: Any) -> int:
        return self._name(value) if self.rule == "names" else self._id(value)


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
    texts, raw = [], [] if lcol else None  # raw: each row's labels as written, mapped once the rule is known
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
                raw.append([(t, where) for t in tags])
        else:
            if text is None or (isinstance(text, str) and not text.strip()):
                raise EdgekitError(f"{where} has an empty '{tcol}'", "remove empty rows or choose another --text-column")
            texts.append(str(text))
            if lcol:
                raw.append((row.get(lcol), where))
    labels, rule = None, None
    if lcol:
        mapping = _Labels(id2label or {})
        mapping.choose([v for r in raw for v in r] if tokens else raw)
        labels = [[mapping(t) for t, _ in r] for r in raw] if tokens else [mapping(v) for v, _ in raw]
        rule = mapping.rule
    return Examples(texts, labels, tcol, lcol, str(p), unused, rule)


def encode(tokenizer, texts: list, max_length: int = 128, words: bool = False):
    """Tokenize a list of texts (or word lists) to int64 numpy arrays, padded to the longest."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, is_split_into_words=words,
                    return_tensors="np")
    arrays = {k: v.astype("int64") for k, v in enc.items()}
    word_ids = [enc.word_ids(i) for i in range(len(texts))] if words else None
    return arrays, word_ids


def max_tokens(config: dict, tokenizer, cap: int) -> int:
    """The longest input the model takes: the smallest of its position embeddings (config.json), the
    tokenizer's model_max_length and ``cap`` (a stage's own limit, 128 for verify). Text longer than this is
    truncated to it rather than fed to positions the model does not have."""
    from edgekit.tasks import max_positions

    limit = cap
    positions = max_positions(config)
    if positions is not None:
        limit = min(limit, positions)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and tok_max > 0:  # unset is a huge sentinel (1e30), which min() ignores
        limit = min(limit, tok_max)
    return max(limit, 1)


def count_truncated(tokenizer, texts: list, max_length: int) -> int:
    """How many texts (or word lists) are longer than ``max_length`` tokens, special tokens included."""
    words = bool(texts) and isinstance(texts[0], list)
    # verbose=False: the length is what is asked; transformers would warn about it otherwise
    ids = tokenizer(texts, truncation=False, is_split_into_words=words, verbose=False)["input_ids"]
    return sum(len(x) > max_length for x in ids)


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
