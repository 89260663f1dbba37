"""Tiny BERT models built from a config and fine-tuned for seconds on learnable synthetic tasks.

The task: a sentence is a few words; it is positive when it holds more positive than negative words.
A 2-layer, 32-wide BERT learns it to well above chance in a few hundred steps, so accuracy in tests means
something (and a damaged model visibly loses it).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POS = ["good", "great", "fine", "happy", "nice", "superb", "lovely", "bright"]
NEG = ["bad", "awful", "poor", "sad", "ugly", "grim", "dull", "nasty"]
NEUTRAL = ["the", "a", "movie", "film", "story", "it", "was", "is", "and", "plot", "actor", "scene", "very", "quite"]
LOC = [("new", "york"), ("paris",), ("san", "diego"), ("london",)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = sorted(set(POS + NEG + NEUTRAL + [w for loc in LOC for w in loc]))
TOKEN_LABELS = ["O", "B-POS", "B-NEG", "B-LOC", "I-LOC"]


def make_sentence(rng: random.Random) -> tuple[list[str], int]:
    n_pos, n_neg = rng.randint(0, 3), rng.randint(0, 3)
    if n_pos == n_neg:
        n_pos += rng.choice([1, -1]) if n_pos else 1
    words = [rng.choice(POS) for _ in range(n_pos)] + [rng.choice(NEG) for _ in range(n_neg)]
    words += [rng.choice(NEUTRAL) for _ in range(rng.randint(2, 6))]
    rng.shuffle(words)
    return words, int(n_pos > n_neg)


def token_tags(words: list[str]) -> list[str]:
    tags, i = [], 0
    while i < len(words):
        w = words[i]
        loc = next((loc for loc in LOC if tuple(words[i : i + len(loc)]) == loc), None)
        if loc:
            tags += ["B-LOC"] + ["I-LOC"] * (len(loc) - 1)
            i += len(loc)
            continue
        tags.append("B-POS" if w in POS else "B-NEG" if w in NEG else "O")
        i += 1
    return tags


def make_token_sentence(rng: random.Random) -> list[str]:
    words, _ = make_sentence(rng)
    if rng.random() < 0.7:
        at = rng.randint(0, len(words))
        words[at:at] = list(rng.choice(LOC))
    return words


def write_text_data(path: Path, n: int, seed: int, fmt: str = "tsv") -> Path:
    rng = random.Random(seed)
    rows = [make_sentence(rng) for _ in range(n)]
    names = ["negative", "positive"]
    if fmt == "tsv":
        path.write_text("text\tlabel\n" + "".join(f"{' '.join(w)}\t{y}\n" for w, y in rows), encoding="utf-8")
    elif fmt == "csv":
        path.write_text("sentence,sentiment\n" + "".join(f"{' '.join(w)},{names[y]}\n" for w, y in rows), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": " ".join(w), "label": names[y]}) + "\n" for w, y in rows), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": [" ".join(w) for w, _ in rows], "label": [y for _, y in rows]}), path)
    return path


def write_token_data(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            words = make_token_sentence(rng)
            f.write(json.dumps({"tokens": words, "tags": token_tags(words)}) + "\n")
    return path


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.model_max_length = 64
    return tok


def _config(num_labels: int | None = None, **kw):
    from transformers import BertConfig

    cfg = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0)
    cfg.update(kw)
    if num_labels:
        cfg["num_labels"] = num_labels
    return BertConfig(**cfg)


def _train(model, batches, steps: int, lr: float = 3e-3) -> None:
    import torch

    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        enc, labels = batches[step % len(batches)]
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_text_classifier(folder: Path, seed: int = 0, steps: int = 300, layers: int = 2) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    tok = _tokenizer(folder)
    cfg = _config(2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                  num_hidden_layers=layers)
    model = BertForSequenceClassification(cfg)
    rng = random.Random(seed)
    batches = []
    for _ in range(40):
        rows = [make_sentence(rng) for _ in range(32)]
        enc = tok([" ".join(w) for w, _ in rows], padding=True, return_tensors="pt")
        batches.append((dict(enc), torch.tensor([y for _, y in rows])))
    _train(model, batches, steps)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_token_classifier(folder: Path, seed: int = 0, steps: int = 300) -> Path:
    import torch
    from transformers import BertForTokenClassification

    torch.manual_seed(seed)
    tok = _tokenizer(folder)
    cfg = _config(len(TOKEN_LABELS), id2label=dict(enumerate(TOKEN_LABELS)),
                  label2id={v: i for i, v in enumerate(TOKEN_LABELS)})
    model = BertForTokenClassification(cfg)
    rng = random.Random(seed)
    batches = []
    for _ in range(40):
        sents = [make_token_sentence(rng) for _ in range(32)]
        enc = tok(sents, is_split_into_words=True, padding=True, return_tensors="pt")
        labels = torch.full(enc["input_ids"].shape, -100)
        for i, words in enumerate(sents):
            tags = token_tags(words)
            for j, wid in enumerate(enc.word_ids(i)):
                if wid is not None:
                    labels[i, j] = TOKEN_LABELS.index(tags[wid])
        batches.append((dict(enc), labels))
    _train(model, batches, steps)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_encoder(folder: Path, classifier: Path) -> Path:
    """The fine-tuned classifier's encoder alone, saved as a plain BertModel (feature-extraction)."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(classifier)
    model.bert.save_pretrained(folder)
    shutil.copy(classifier / "vocab.txt", folder / "vocab.txt")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (classifier / f).exists():
            shutil.copy(classifier / f, folder / f)
    return folder


# ---- fixtures: built once per session; tests that might write into them get a copy -------------------


@pytest.fixture(scope="session")
def _models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clf = build_text_classifier(root / "text-clf")
    return {
        "text": clf,
        "token": build_token_classifier(root / "token-clf"),
        "encoder": build_encoder(root / "encoder", clf),
    }


@pytest.fixture(scope="session")
def text_ckpt(_models) -> Path:
    return _models["text"]


@pytest.fixture(scope="session")
def text_onnx(text_ckpt, tmp_path_factory) -> Path:
    """The text classifier exported by ``edgekit export`` (read-only for the tests that share it)."""
    from helpers import run_cli

    out = tmp_path_factory.mktemp("export") / "onnx"
    run_cli("export", text_ckpt, "-o", out)
    return out


@pytest.fixture(scope="session")
def onnx_dir(text_onnx) -> Path:
    return text_onnx


@pytest.fixture(scope="session")
def token_ckpt(_models) -> Path:
    return _models["token"]


@pytest.fixture(scope="session")
def encoder_ckpt(_models) -> Path:
    return _models["encoder"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_text_data(d / "eval.tsv", 200, seed=101)
    write_text_data(d / "calib.tsv", 64, seed=202)
    write_text_data(d / "eval.csv", 100, seed=303, fmt="csv")
    write_text_data(d / "eval.jsonl", 100, seed=404, fmt="jsonl")
    write_text_data(d / "eval.parquet", 100, seed=505, fmt="parquet")
    write_token_data(d / "tokens.jsonl", 150, seed=606)
    return d


@pytest.fixture(scope="session")
def released_run(text_ckpt, data_dir, tmp_path_factory) -> Path:
    """A compress run verified on eval.tsv (``run/``) and its release bundle (``dist/model``, ``dist/model.tar.gz``);
    read-only for the tests: the gate tests copy what they change."""
    from helpers import run_cli

    root = tmp_path_factory.mktemp("released")
    run_cli("compress", text_ckpt, "-o", root / "run", "--data", data_dir / "eval.tsv", "--bench-iterations", "5",
            "--bench-min-seconds", "0")
    run_cli("release", "build", root / "run", "-o", root / "dist", "--name", "model")
    return root


def tree_digest(path: Path) -> dict[str, str]:
    """File name -> sha256 for every file under path: proof that an input was not modified."""
    from edgekit.artifacts import sha256_file

    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}
