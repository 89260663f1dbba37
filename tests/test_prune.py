"""edgekit prune: physically smaller models that reload, export, keep their accuracy, and never touch the input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SPECIAL, WORDS, _tokenizer, tree_digest
from edgekit.checkpoint import PRUNING_FILE, load_model, load_tokenizer, open_checkpoint
from edgekit.compress.importance import mask_hooks
from edgekit.compress.prune import PruneConfig, PruneReport, prune
from edgekit.compress.prune_arch import ARCHS, BiasOnly, Dims, encoder_layers, get_arch, get_module, layer_macs
from edgekit.errors import EdgekitError


def _rows(path: Path) -> tuple[list[str], list[int]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


@torch.no_grad()
def _outputs(folder: Path, texts: list[str]):
    model = load_model(open_checkpoint(folder))
    enc = load_tokenizer(folder)(texts, padding=True, return_tensors="pt")
    return model(**enc, output_hidden_states=True), enc


def _accuracy(folder: Path, data: Path) -> float:
    texts, labels = _rows(data)
    out, _ = _outputs(folder, texts)
    return (out.logits.argmax(-1) == torch.tensor(labels)).float().mean().item()


def _structure(model) -> list[tuple[int, int]]:
    """(heads, neurons) per layer, read off the reloaded modules' shapes."""
    arch = get_arch(model.config.model_type)
    dims = Dims.of(model.config, arch)
    out = []
    for layer in encoder_layers(model, arch):
        attn, ffn = get_module(layer, arch.attn_out), get_module(layer, arch.ffn_out)
        out.append((0 if isinstance(attn, BiasOnly) else attn.in_features // dims.head_size,
                    0 if isinstance(ffn, BiasOnly) else ffn.in_features))
    return out


@pytest.fixture(scope="module")
def pruned30(text_ckpt, data_dir, tmp_path_factory):
    before = tree_digest(text_ckpt)
    out = tmp_path_factory.mktemp("p30") / "pruned"
    calls = []
    report = prune(text_ckpt, out, PruneConfig(sparsity=0.3), calibration_data=data_dir / "calib.tsv",
                   progress=lambda d, c, t: calls.append((d, c, t)))
    return out, report, before, calls


def test_prune_removes_flops_and_params_and_reloads(pruned30, text_ckpt):
    out, report, before, calls = pruned30
    assert isinstance(report, PruneReport) and report.criterion == "fisher-labels"
    assert tree_digest(text_ckpt) == before  # the input checkpoint is byte-identical
    assert 0.29 <= report.flops_reduction <= 0.36
    model = load_model(open_checkpoint(out))
    assert sum(p.numel() for p in model.parameters()) == report.params_after < report.params_before
    # FLOPs recounted from the reloaded modules' shapes agree with the report
    dims = Dims.of(model.config, get_arch("bert"))
    structure = _structure(model)
    assert structure == [(lr.heads_kept, lr.neurons_kept) for lr in report.layers]
    assert report.flops_after == sum(2 * layer_macs(h, n, dims, report.seq_len) for h, n in structure)
    assert report.flops_before == 2 * dims.layers * layer_macs(dims.heads, dims.ffn, dims, report.seq_len)
    # heads are native (config.pruned_heads), FFN sizes and provenance in edgekit_pruning.json
    config, spec = (json.loads((out / f).read_text()) for f in ("config.json", PRUNING_FILE))
    assert {int(k): sorted(v) for k, v in config["pruned_heads"].items() if v} == {
        i: sorted(set(range(4)) - set(layer["heads_kept"])) for i, layer in enumerate(spec["layers"])
        if len(layer["heads_kept"]) < 4}
    assert (out / "vocab.txt").read_bytes() == (text_ckpt / "vocab.txt").read_bytes()
    assert {d for d, _, _ in calls} >= {"Fisher importance", "Least-squares re-fit", "Saving"}
    d = report.to_dict()
    assert d["schema_version"] == 1 and len(d["layers"]) == 2 and json.dumps(d)
    assert "FFN neurons" in report.to_markdown()


def test_accuracy_kept_at_30_and_collapses_at_95(pruned30, text_ckpt, data_dir, tmp_path):
    eval_tsv = data_dir / "eval.tsv"
    original = _accuracy(text_ckpt, eval_tsv)
    assert original >= 0.95
    assert _accuracy(pruned30[0], eval_tsv) >= max(0.9, original - 0.05)
    report = prune(text_ckpt, tmp_path / "p95", PruneConfig(sparsity=0.95), calibration_data=data_dir / "calib.tsv")
    assert report.flops_reduction >= 0.94
    assert _accuracy(tmp_path / "p95", eval_tsv) <= 0.65  # near chance: the task needs attention over the words


def test_importance_choice_beats_a_random_choice_at_30(pruned30, text_ckpt, data_dir):
    """The heads and neurons the 30% run kept, against random choices of the same number per layer, on the
    same original model (masked, no re-fit for either): the importance-based choice must be measurably
    closer to the original, or the Fisher ranking is not doing its job."""
    spec = json.loads((pruned30[0] / PRUNING_FILE).read_text())
    original = load_model(open_checkpoint(text_ckpt))
    arch = get_arch("bert")
    dims = Dims.of(original.config, arch)
    texts, labels = _rows(data_dir / "eval.tsv")
    enc = load_tokenizer(text_ckpt)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = original(**enc).logits

    def gap(choice) -> tuple[float, float]:
        """(mean squared logit error against the original, accuracy) with only ``choice`` kept."""
        masks = {"heads": torch.zeros(1, dims.layers, dims.heads), "neurons": torch.zeros(1, dims.layers, dims.ffn)}
        for i, (heads, neurons) in enumerate(choice):
            masks["heads"][0, i, heads] = 1
            masks["neurons"][0, i, neurons] = 1
        with torch.no_grad(), mask_hooks(original, arch, dims, masks):
            logits = original(**enc).logits
        accuracy = (logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
        return ((logits - reference) ** 2).mean().item(), accuracy

    chosen = [(layer["heads_kept"], layer["neuron_index"]) for layer in spec["layers"]]
    g = torch.Generator().manual_seed(0)
    randoms = [gap([(torch.randperm(dims.heads, generator=g)[: len(h)].tolist(),
                     torch.randperm(dims.ffn, generator=g)[: len(n)].tolist()) for h, n in chosen])
               for _ in range(20)]
    err, acc = gap(chosen)
    random_errs = sorted(e for e, _ in randoms)
    random_accs = sorted(a for _, a in randoms)
    assert err < 0.5 * random_errs[len(randoms) // 2]  # under half the median random choice's error
    assert err < random_errs[2]  # and better than all but the luckiest couple of random draws
    assert acc >= random_accs[len(randoms) // 2]


def test_least_squares_refit_reduces_layer_output_error(text_ckpt, data_dir, tmp_path):
    cfg = dict(sparsity=0.5, calibration_samples=64)
    with_refit = prune(text_ckpt, tmp_path / "refit", PruneConfig(**cfg), calibration_data=data_dir / "calib.tsv")
    prune(text_ckpt, tmp_path / "plain", PruneConfig(**cfg, refit=False), calibration_data=data_dir / "calib.tsv")
    # per projection, on held-out calibration samples: never worse, and clearly better somewhere
    fits = [f for lr in with_refit.layers for f in lr.refit.values()]
    assert all(f["error_after"] <= f["error_before"] for f in fits)
    assert min(f["error_after"] / max(f["error_before"], 1e-12) for f in fits) < 0.5
    # end to end, on the (unseen) eval texts: the last layer's output is closer to the original's
    texts, _ = _rows(data_dir / "eval.tsv")
    ref, enc = _outputs(text_ckpt, texts)
    mask = enc["attention_mask"].bool()

    def error(folder):
        out, _ = _outputs(folder, texts)
        diff = (out.hidden_states[-1] - ref.hidden_states[-1])[mask]
        return float(diff.pow(2).sum() / ref.hidden_states[-1][mask].pow(2).sum())

    assert error(tmp_path / "refit") < 0.7 * error(tmp_path / "plain")


def test_unlabeled_calibration_uses_reconstruction(text_ckpt, data_dir, tmp_path):
    texts, _ = _rows(data_dir / "calib.tsv")
    (tmp_path / "texts.tsv").write_text("text\n" + "\n".join(texts) + "\n", encoding="utf-8")
    report = prune(text_ckpt, tmp_path / "out", PruneConfig(sparsity=0.3), calibration_data=tmp_path / "texts.tsv")
    assert report.criterion == "fisher-reconstruction"
    assert _accuracy(tmp_path / "out", data_dir / "eval.tsv") >= 0.9
    # labels present but ignored on request; an in-memory list of texts works too
    r2 = prune(text_ckpt, tmp_path / "out2", PruneConfig(sparsity=0.3, use_labels=False), calibration_data=texts)
    assert r2.criterion == "fisher-reconstruction"


def test_distillation_lowers_the_gap_or_reverts(text_ckpt, data_dir, tmp_path):
    calib = data_dir / "calib.tsv"
    report = prune(text_ckpt, tmp_path / "out", PruneConfig(sparsity=0.7, refit=False, use_labels=False,
                                                            recover_steps=12, recover_lr=3e-3), calibration_data=calib)
    r = report.recover
    assert r["steps"] == 12 and not r["reverted"] and r["loss_after"] < 0.7 * r["loss_before"]
    report = prune(text_ckpt, tmp_path / "bad-lr", PruneConfig(sparsity=0.7, recover_steps=4, recover_lr=10.0),
                   calibration_data=calib)
    assert report.recover["reverted"] and report.recover["loss_after"] > report.recover["loss_before"]
    assert "reverted" in report.to_markdown()


def test_feature_extraction_and_token_classification(encoder_ckpt, token_ckpt, data_dir, tmp_path):
    texts, _ = _rows(data_dir / "calib.tsv")
    report = prune(encoder_ckpt, tmp_path / "enc", PruneConfig(sparsity=0.4), calibration_data=texts)
    assert report.task == "feature-extraction" and report.criterion == "fisher-reconstruction"
    out, _ = _outputs(tmp_path / "enc", texts[:8])
    ref, _ = _outputs(encoder_ckpt, texts[:8])
    cos = torch.nn.functional.cosine_similarity(out.last_hidden_state[:, 0], ref.last_hidden_state[:, 0], -1)
    assert cos.mean() > 0.9
    report = prune(token_ckpt, tmp_path / "tok", PruneConfig(heads=0.25, ffn=0.5),
                   calibration_data=data_dir / "tokens.jsonl")
    assert report.criterion == "fisher-labels"
    assert [lr.heads_kept for lr in report.layers] and sum(lr.heads_kept for lr in report.layers) == 6
    assert sum(lr.neurons_kept for lr in report.layers) == 64
    model = load_model(open_checkpoint(tmp_path / "tok"))
    assert type(model).__name__ == "BertForTokenClassification"


def _tiny(model_type: str, folder: Path) -> Path:
    import transformers

    v = len(SPECIAL) + len(WORDS)
    common = dict(vocab_size=v, num_labels=2, max_position_embeddings=70, pad_token_id=0)
    if model_type == "distilbert":
        cfg = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common)
    else:
        cfg = transformers.AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    tok = _tokenizer(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_family_slices_exactly_like_masking(model_type, data_dir, tmp_path):
    """Removing heads/neurons physically gives the same outputs as zeroing their masks in the original model,
    for every family in the table, including layers left with no head or no neuron."""
    src = _tiny(model_type, tmp_path / "src")
    texts, _ = _rows(data_dir / "calib.tsv")
    original = load_model(open_checkpoint(src))
    arch = get_arch(model_type)
    dims = Dims.of(original.config, arch)
    enc = load_tokenizer(src)(texts[:6], padding=True, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if model_type != "distilbert" or k != "token_type_ids"}
    for sparsity in (0.5, 0.97):
        out = tmp_path / f"out{sparsity}"
        prune(src, out, PruneConfig(sparsity=sparsity, refit=False), calibration_data=texts)
        spec = json.loads((out / PRUNING_FILE).read_text())
        masks = {"heads": torch.zeros(1, dims.layers, dims.heads), "neurons": torch.zeros(1, dims.layers, dims.ffn)}
        for i, layer in enumerate(spec["layers"]):
            masks["heads"][0, i, layer["heads_kept"]] = 1
            masks["neurons"][0, i, layer["neuron_index"]] = 1
        with torch.no_grad(), mask_hooks(original, arch, dims, masks):
            expected = original(**enc).logits
        with torch.no_grad():
            got = load_model(open_checkpoint(out))(**enc).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert any(layer["heads_kept"] == [] for layer in spec["layers"])  # the 97% run exercised the bypass


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_pruned_model_exports_to_onnx(text_ckpt, data_dir, tmp_path, sparsity):
    import numpy as np
    import onnxruntime as ort
    from optimum.exporters.onnx import onnx_export_from_model

    prune(text_ckpt, tmp_path / "pruned", PruneConfig(sparsity=sparsity), calibration_data=data_dir / "calib.tsv")
    model = load_model(open_checkpoint(tmp_path / "pruned"))
    onnx_export_from_model(model, tmp_path / "onnx", task="text-classification", opset=17, do_validation=False)
    texts, _ = _rows(data_dir / "eval.tsv")
    enc = load_tokenizer(tmp_path / "pruned")(texts[:16], padding=True, return_tensors="np")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(got - expected).max() < 1e-4


def test_bad_inputs_are_named(text_ckpt, data_dir, tmp_path):
    for kw, words in [(dict(sparsity=1.5), "between 0 and 1"), (dict(sparsity=0.0), "between 0 and 1"),
                      (dict(), "no pruning target"), (dict(sparsity=0.3, heads=0.2), "cannot be combined"),
                      (dict(heads=1.0), "fraction in [0, 1)"), (dict(sparsity=0.3, recover_steps=-1), "recover_steps")]:
        with pytest.raises(EdgekitError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            PruneConfig(**kw)
    cfg = PruneConfig(sparsity=0.3)
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence_x\tlabel\ngood\t1\n", encoding="utf-8")
    with pytest.raises(EdgekitError, match="its columns are: sentence_x, label"):
        prune(text_ckpt, tmp_path / "o1", cfg, calibration_data=bad)
    with pytest.raises(EdgekitError, match="needs calibration data"):
        prune(text_ckpt, tmp_path / "o2", cfg)
    with pytest.raises(EdgekitError, match="overlaps the input"):
        prune(text_ckpt, text_ckpt / "pruned", cfg, calibration_data=data_dir / "calib.tsv")
    other = tmp_path / "mpnet"
    shutil.copytree(text_ckpt, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mpnet"}))
    with pytest.raises(EdgekitError, match="pruning does not support model type 'mpnet'"):
        prune(other, tmp_path / "o3", cfg, calibration_data=data_dir / "calib.tsv")
    assert not any(p.name.startswith(("o1", "o2", "o3", ".o")) for p in tmp_path.iterdir())  # nothing half-written


def test_pruned_checkpoint_is_not_pruned_again_and_damage_is_named(pruned30, data_dir, tmp_path):
    out = pruned30[0]
    with pytest.raises(EdgekitError, match="already pruned"):
        prune(out, tmp_path / "again", PruneConfig(sparsity=0.3), calibration_data=data_dir / "calib.tsv")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    spec = json.loads((broken / PRUNING_FILE).read_text())
    spec["layers"][1]["neurons_kept"] += 1
    (broken / PRUNING_FILE).write_text(json.dumps(spec))
    with pytest.raises(EdgekitError, match="do not fit the pruned structure"):
        load_model(open_checkpoint(broken))


# ---- the command line and the compress integration -------------------------------------------------------


def test_prune_command(text_ckpt, data_dir, tmp_path):
    from helpers import run_cli

    before = tree_digest(text_ckpt)
    r = run_cli("prune", text_ckpt, "-o", tmp_path / "pruned", "--sparsity", "0.3", "--calibration-data",
                data_dir / "calib.tsv", "--calibration-samples", "64", "--json")
    report = json.loads(r.stdout)
    assert 0.25 < report["flops_reduction"] < 0.35 and report["params_after"] < report["params_before"]
    assert report["criterion"] == "fisher-labels" and report["calibration_samples"] == 64
    assert report["recipe"]["prune"]["sparsity"] == 0.3  # the resolved recipe is embedded
    assert (tmp_path / "pruned" / PRUNING_FILE).is_file()
    assert tree_digest(text_ckpt) == before
    r = run_cli("prune", text_ckpt, "-o", tmp_path / "p2", "--heads", "0.25", "--no-labels", "--calibration-data",
                data_dir / "calib.tsv", "--calibration-samples", "32")
    assert "fisher-reconstruction" in r.stdout and "Per layer" in r.stdout


def test_prune_command_bad_input(text_ckpt, data_dir, tmp_path):
    from helpers import assert_user_error, run_cli

    calib = data_dir / "calib.tsv"
    cases = [
        (["--sparsity", "1.5", "--calibration-data", calib], "between 0 and 1"),
        (["--sparsity", "0", "--calibration-data", calib], "between 0 and 1"),
        (["--calibration-data", calib], "no pruning target"),
        (["--sparsity", "0.3"], "needs calibration data"),
        (["--sparsity", "0.3", "--calibration-data", tmp_path / "missing.tsv"], "does not exist"),
    ]
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence_x\tlabel\ngood\t1\n", encoding="utf-8")
    cases.append((["--sparsity", "0.3", "--calibration-data", bad], "sentence_x, label"))
    for args, words in cases:
        assert_user_error(run_cli("prune", text_ckpt, "-o", tmp_path / "out", *args, expect=None), words)
    other = tmp_path / "mpnet"
    shutil.copytree(text_ckpt, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "mpnet"}))
    assert_user_error(run_cli("prune", other, "-o", tmp_path / "out", "--sparsity", "0.3", "--calibration-data", calib,
                              expect=None), "mpnet")
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


@pytest.mark.parametrize("sparsity,code", [("0.3", 0), ("0.95", 1)])
def test_compress_with_prune_gates_against_the_original(text_ckpt, data_dir, tmp_path, sparsity, code):
    from helpers import run_cli

    before = tree_digest(text_ckpt)
    out = tmp_path / "run"
    r = run_cli("compress", text_ckpt, "-o", out, "--prune", sparsity, "--calibration-data", data_dir / "calib.tsv",
                "--data", data_dir / "eval.tsv", "--no-bench", "--json", expect=code)
    report = json.loads(r.stdout)
    assert report["passed"] is (code == 0)
    assert abs(report["prune"]["flops_reduction"] - float(sparsity)) < 0.06
    assert report["verify"]["original"] == str(text_ckpt.resolve())  # never the pruned checkpoint
    assert report["config"]["recipe"]["prune"]["sparsity"] == float(sparsity)
    assert (out / "pruned" / PRUNING_FILE).is_file() and (out / "int8" / "model.onnx").is_file()
    assert "## Prune" in (out / "report.md").read_text()
    assert tree_digest(text_ckpt) == before
    if code:
        assert report["verify"]["candidate_metrics"]["accuracy"] < report["verify"]["original_metrics"]["accuracy"] - 10
        return
    run_cli("release", "build", out, "-o", tmp_path / "dist", "--name", "pruned")  # the bundle carries the pruning summary
    manifest = json.loads((tmp_path / "dist" / "pruned" / "manifest.json").read_text())
    p = manifest["pruning"]
    assert p["flops_reduction"] == report["prune"]["flops_reduction"] and len(p["layers"]) == len(report["prune"]["layers"])
    assert "## Pruning" in (tmp_path / "dist" / "pruned" / "MODEL_CARD.md").read_text()


def test_compress_prune_needs_calibration_and_recipe_round_trip(text_ckpt, data_dir, tmp_path, monkeypatch):
    import yaml

    from helpers import assert_user_error, run_cli

    monkeypatch.chdir(tmp_path)  # a stdout recipe's paths are relative to the current folder, where r.yaml goes

    r = run_cli("compress", text_ckpt, "-o", tmp_path / "run", "--prune", "0.3", "--data", data_dir / "eval.tsv",
                expect=None)
    assert_user_error(r, "--calibration-data")
    assert not (tmp_path / "run").exists()
    r = run_cli("compress", text_ckpt, "--prune", "0.4", "--calibration-data", data_dir / "calib.tsv", "--dump-recipe")
    recipe = yaml.safe_load(r.stdout)
    assert recipe["prune"]["sparsity"] == 0.4 and recipe["prune"]["refit"] is True
    assert yaml.safe_load(run_cli("compress", text_ckpt, "--dump-recipe").stdout)["prune"] is None
    (tmp_path / "r.yaml").write_text(r.stdout)
    again = run_cli("compress", "--recipe", tmp_path / "r.yaml", "--dump-recipe").stdout
    assert yaml.safe_load(again) == recipe
    r = run_cli("prune", text_ckpt, "--heads", "0.5", "--no-refit", "--dump-recipe")
    p = yaml.safe_load(r.stdout)["prune"]
    assert p["heads"] == 0.5 and p["refit"] is False and p["sparsity"] is None
