"""edgekit prune --layers/--depth: whole encoder layers chosen by the loss measured with each bypassed (--layers)
or by the Fisher of a per-layer mask (--depth), removed physically, re-fitted against the original layer at each
kept layer's original index, reloaded, exported."""

from __future__ import annotations

import copy
import json
import statistics

import pytest
import torch

from conftest import build_text_classifier, tree_digest, write_text_data
from edgekit.checkpoint import PRUNING_FILE, load_model, load_tokenizer, open_checkpoint
from edgekit.compress.importance import mask_hooks
from edgekit.compress.prune import PruneConfig, PruneReport, prune
from edgekit.compress.prune_arch import ARCHS, Dims, encoder_layers, get_arch, remove_layers
from edgekit.compress.recover import refit_layers
from edgekit.errors import EdgekitError
from edgekit.reports import to_markdown
from helpers import assert_user_error, run_cli
from test_prune import _accuracy, _rows, _structure, _tiny

LAYERS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small do not pay for a second thread: measured on the shared 2-core runner, building the
    4-layer model took 45 s of CPU with two threads and 11 s with one (the threads spin waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer classifier and 256 calibration sentences (prune's default count).

    Why 256 and not the 64 of calib.tsv: a confident model's labeled Fisher rests on its few uncertain samples.
    Measured on four 4-layer models built like this one (other seeds): with 64 sentences one of them lost a
    layer costlier than the median, with 256 none did."""
    root = tmp_path_factory.mktemp("deep")
    return build_text_classifier(root / "clf", seed=2, steps=150, layers=LAYERS), \
        write_text_data(root / "calib.tsv", 256, seed=707)


@pytest.fixture(scope="module")
def removed_one(deep, tmp_path_factory):
    """``edgekit prune --layers 1`` through the command line: (output folder, JSON report, input digest before)."""
    ckpt, calib = deep
    before = tree_digest(ckpt)
    out = tmp_path_factory.mktemp("layers1") / "pruned"
    r = run_cli("prune", ckpt, "-o", out, "--layers", "1", "--calibration-data", calib, "--json")
    return out, json.loads(r.stdout), before


def _masked(model, enc, keep_layers: list[int]) -> torch.Tensor:
    """The original's logits with every layer outside ``keep_layers`` bypassed through its layer mask."""
    arch = get_arch(model.config.model_type)
    dims = Dims.of(model.config, arch)
    masks = {"heads": torch.ones(1, dims.layers, dims.heads), "neurons": torch.ones(1, dims.layers, dims.ffn),
             "layers": torch.zeros(1, dims.layers)}
    masks["layers"][0, keep_layers] = 1
    with torch.no_grad(), mask_hooks(model, arch, dims, masks):
        return model(**enc).logits


def test_layers_1_through_the_cli_reloads_exports_and_keeps_accuracy(removed_one, deep, data_dir, tmp_path):
    import numpy as np
    import onnxruntime as ort

    out, report, before = removed_one
    ckpt, _ = deep
    assert tree_digest(ckpt) == before  # the input checkpoint is byte-identical
    (gone,) = report["removed_layers"]
    kept = [i for i in range(LAYERS) if i != gone]
    config, spec = (json.loads((out / f).read_text()) for f in ("config.json", PRUNING_FILE))
    assert config["num_hidden_layers"] == 3 and not config.get("pruned_heads")
    assert spec["schema_version"] == 2 and spec["kept_layers"] == kept and len(spec["layers"]) == 3
    # the report speaks of the ORIGINAL layers: one removed (no FLOPs left), three kept whole
    assert [lr["layer"] for lr in report["layers"]] == list(range(LAYERS))
    assert [lr["removed"] for lr in report["layers"]] == [i == gone for i in range(LAYERS)]
    assert report["layers"][gone]["flops_after"] == 0 and report["layers"][gone]["refit"] is None
    assert report["flops_reduction"] == pytest.approx(0.25)  # every layer costs the same
    assert report["recipe"]["prune"]["layers"] == 1
    model = load_model(open_checkpoint(out))
    assert len(encoder_layers(model, get_arch("bert"))) == 3 and _structure(model) == [(4, 64)] * 3
    original = _accuracy(ckpt, data_dir / "eval.tsv")
    assert original >= 0.95 and _accuracy(out, data_dir / "eval.tsv") >= original - 0.03
    md = PruneReport.sections_of(report)
    assert any(row[2].text == "removed" for s in md for row in s.rows)

    # exported by `edgekit export` (which validates against torch: a breach is exit 1), and checked here too
    run_cli("export", out, "-o", tmp_path / "onnx")
    texts, _ = _rows(data_dir / "eval.tsv")
    enc = load_tokenizer(out)(texts[:32], padding=True, return_tensors="np")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert np.abs(session.run(["logits"], feeds)[0] - expected).max() < 1e-4


def test_a_release_card_says_a_removed_layer_is_removed(removed_one):
    """The release manifest and card list every ORIGINAL layer; the removed one as removed, not as 0 heads."""
    from edgekit.release.card import pruning_section
    from edgekit.release.manifest import _pruning

    out, report, _ = removed_one
    gone = report["removed_layers"][0]
    for summary in (_pruning({}, out), _pruning({"prune": report}, out / "missing")):  # the checkpoint's spec; compress
        assert [x["layer"] for x in summary["layers"]] == list(range(LAYERS))
        assert [x["removed"] for x in summary["layers"]] == [i == gone for i in range(LAYERS)]
        assert all(x["heads_kept"] == 4 for x in summary["layers"] if not x["removed"])
        table = pruning_section(summary)[-1]
        assert f"| {gone} | removed | removed |" in table and "| 0 | 0 |" not in table


def test_the_removed_layer_costs_no_more_than_the_median_alternative(removed_one, deep, data_dir, tmp_path):
    """Measured, not estimated: bypass each layer of the original in turn and take the held-out loss."""
    ckpt, calib = deep
    gone = removed_one[1]["removed_layers"][0]
    original = load_model(open_checkpoint(ckpt))
    texts, labels = _rows(data_dir / "eval.tsv")
    enc = load_tokenizer(ckpt)(texts, padding=True, return_tensors="pt")
    loss = [torch.nn.functional.cross_entropy(_masked(original, enc, [k for k in range(LAYERS) if k != i]),
                                              torch.tensor(labels)).item() for i in range(LAYERS)]
    others = [x for i, x in enumerate(loss) if i != gone]
    assert loss[gone] <= statistics.median(others), loss
    # there was a costly layer to avoid, and it was (the trained model depends on the CPU's kernels: its costliest
    # layer was over 3x the cheapest on an AVX2 machine, 2.0x on an AVX-512 one)
    assert max(loss) > 1.5 * min(loss) and loss[gone] < max(loss)
    # Physically removing it (no re-fit) is exactly the bypass: the layer mask and the slicing agree.
    prune(ckpt, tmp_path / "plain", PruneConfig(layers=1, refit=False), calibration_data=calib)
    with torch.no_grad():
        got = load_model(open_checkpoint(tmp_path / "plain"))(**enc).logits
    torch.testing.assert_close(got, _masked(original, enc, [i for i in range(LAYERS) if i != gone]),
                               atol=1e-5, rtol=1e-4)


def test_layers_go_by_the_loss_measured_with_each_bypassed(removed_one, deep):
    """--layers takes out the layer whose bypass costs least on the calibration data, as measured: the report's
    losses are the cross-entropy of the original with each layer bypassed (recomputed here in one batch), and the
    removed layer is their minimum. The mask Fisher ranked a layer 1.6x costlier than the median first here."""
    ckpt, calib = deep
    report = removed_one[1]
    (record,) = report["layer_removal"]
    original = load_model(open_checkpoint(ckpt))
    texts, labels = _rows(calib)
    enc = load_tokenizer(ckpt)(texts, padding=True, return_tensors="pt")
    measured = {str(i): torch.nn.functional.cross_entropy(
        _masked(original, enc, [k for k in range(LAYERS) if k != i]), torch.tensor(labels)).item()
        for i in range(LAYERS)}
    assert record["losses"] == pytest.approx(measured, rel=1e-3)
    assert record["removed"] == report["removed_layers"][0] == int(min(measured, key=measured.get))
    assert any("the least loss measured with one layer bypassed" in n.text
               for sec in PruneReport.sections_of(report) for n in sec.notes)


def test_refit_matches_each_kept_layer_to_the_original_at_its_index(removed_one, deep, data_dir, tmp_path):
    out, report, _ = removed_one
    ckpt, calib = deep
    prune(ckpt, tmp_path / "plain", PruneConfig(layers=1, refit=False), calibration_data=calib)
    texts, _ = _rows(data_dir / "eval.tsv")
    enc = load_tokenizer(ckpt)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = load_model(open_checkpoint(ckpt))(**enc).logits

        def gap(folder):
            return (load_model(open_checkpoint(folder))(**enc).logits - reference).pow(2).mean().item()

        assert gap(out) < 0.7 * gap(tmp_path / "plain")  # held-out texts: the re-fit closed much of the gap
    # This model loses its last layer (the least important here), so no layer follows it: the one before it
    # stands in, its FFN matched to the original's final residual sum. The layers before that one compute
    # exactly what the original's do: nothing to fit there.
    gone = report["removed_layers"][0]
    assert gone == LAYERS - 1
    assert [lr["refit"] for lr in report["layers"][: gone - 1]] == [{}] * (gone - 1)
    fits = report["layers"][gone - 1]["refit"]
    assert all(f["error_after"] <= f["error_before"] for f in fits.values())
    stand_in = fits["ffn"]
    assert stand_in["error_before"] > 0.05 and stand_in["error_after"] < 0.5 * stand_in["error_before"]


def test_refit_lets_the_next_kept_layer_stand_in_for_a_removed_middle_one(deep, data_dir):
    ckpt, calib = deep
    original = load_model(open_checkpoint(ckpt))
    arch = get_arch("bert")
    pruned = copy.deepcopy(original)
    remove_layers(pruned, arch, [0, 2, 3])
    tokenizer = load_tokenizer(ckpt)
    texts, _ = _rows(calib)
    batches = [dict(tokenizer(texts[i: i + 32], padding=True, return_tensors="pt")) for i in range(0, len(texts), 32)]
    held_out, _ = _rows(data_dir / "eval.tsv")
    enc = tokenizer(held_out, padding=True, return_tensors="pt")
    with torch.no_grad():
        reference = original(**enc).logits
        gap_before = (pruned(**enc).logits - reference).pow(2).mean().item()
    fits = refit_layers(original, pruned, arch, batches, kept=[0, 2, 3])
    with torch.no_grad():
        gap_after = (pruned(**enc).logits - reference).pow(2).mean().item()
    assert len(fits) == 3 and fits[0] == {}  # layer 0 is the original's own, on the original's input
    # layer 2 is matched to the original's layer 2, whose input went through layer 1: it takes up layer 1's work
    after_gap = fits[1]["attention"]
    assert after_gap["error_before"] > 0.05 and after_gap["error_after"] < 0.5 * after_gap["error_before"]
    assert gap_after < 0.5 * gap_before


def test_depth_search_records_its_choice(deep, tmp_path):
    ckpt, calib = deep
    r = run_cli("prune", ckpt, "-o", tmp_path / "out", "--sparsity", "0.5", "--depth", "--calibration-data", calib,
                "--json")
    report = json.loads(r.stdout)
    depth = report["depth"]
    candidates = depth["candidates"]
    assert [c["layers_removed"] for c in candidates] == list(range(LAYERS))
    best = min(candidates, key=lambda c: c["estimated_loss"])
    assert depth["chosen"] == best["layers_removed"] == len(report["removed_layers"])
    assert sorted(best["removed"]) == report["removed_layers"]
    # candidate k removes the k layers of smallest Fisher, and every candidate keeps within the FLOPs budget
    by_fisher = sorted(range(LAYERS), key=lambda i: report["layers"][i]["fisher"])
    assert all(sorted(c["removed"]) == sorted(by_fisher[: c["layers_removed"]]) for c in candidates)
    assert all(c["flops_after"] <= 0.5 * report["flops_before"] for c in candidates)
    assert report["flops_reduction"] >= 0.49
    model = load_model(open_checkpoint(tmp_path / "out"))
    assert len(encoder_layers(model, get_arch("bert"))) == LAYERS - depth["chosen"]
    assert f"Depth search: {depth['chosen']} whole layers removed" in to_markdown(PruneReport.sections_of(report))


def test_layers_combine_with_sparsity_and_ratios(deep, tmp_path):
    ckpt, calib = deep
    r = prune(ckpt, tmp_path / "s", PruneConfig(layers=1, sparsity=0.5), calibration_data=calib)
    # the sparsity counts every original layer's FLOPs: the removed layer's 25% first, the search the rest
    assert len(r.removed_layers) == 1 and 0.49 <= r.flops_reduction <= 0.53
    kept = [lr for lr in r.layers if not lr.removed]
    assert sum(lr.heads_kept for lr in kept) < 12 or sum(lr.neurons_kept for lr in kept) < 192
    assert _structure(load_model(open_checkpoint(tmp_path / "s"))) == [(lr.heads_kept, lr.neurons_kept) for lr in kept]
    # --heads counts the removed layer's 4 heads too: half of 16 is 8 kept, so 4 more go from the kept layers
    r = prune(ckpt, tmp_path / "h", PruneConfig(layers=1, heads=0.5), calibration_data=calib)
    assert sum(lr.heads_kept for lr in r.layers) == 8 and sum(lr.neurons_kept for lr in r.layers) == 3 * 64
    # two removed layers already took more than a quarter of the heads: none more goes
    r = prune(ckpt, tmp_path / "h2", PruneConfig(layers=2, heads=0.25), calibration_data=calib)
    assert sum(lr.heads_kept for lr in r.layers) == 8 and len(r.removed_layers) == 2
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    spec = json.loads((tmp_path / "s" / PRUNING_FILE).read_text())
    # pruned_heads are renumbered to the kept layers' new positions
    assert {int(k): sorted(v) for k, v in (config.get("pruned_heads") or {}).items() if v} == {
        i: sorted(set(range(4)) - set(layer["heads_kept"])) for i, layer in enumerate(spec["layers"])
        if len(layer["heads_kept"]) < 4}


def test_distillation_runs_on_the_shallower_model(deep, tmp_path):
    ckpt, calib = deep
    r = prune(ckpt, tmp_path / "out", PruneConfig(layers=2, refit=False, recover_steps=8, recover_lr=1e-3),
              calibration_data=calib)
    assert r.recover["steps"] == 8 and not r.recover["reverted"]
    assert r.recover["loss_after"] < 0.8 * r.recover["loss_before"]
    assert len(encoder_layers(load_model(open_checkpoint(tmp_path / "out")), get_arch("bert"))) == 2


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_every_family_removes_a_layer_exactly_like_its_mask(model_type, data_dir, tmp_path):
    """The layer count attribute (num_hidden_layers, DistilBERT's n_layers) and the layer list come from the
    EncoderArch table: every family reloads with one layer fewer and computes what the bypassed original does."""
    src = _tiny(model_type, tmp_path / "src")
    texts, _ = _rows(data_dir / "calib.tsv")
    prune(src, tmp_path / "out", PruneConfig(layers=1, refit=False), calibration_data=texts)
    arch = get_arch(model_type)
    kept = json.loads((tmp_path / "out" / PRUNING_FILE).read_text())["kept_layers"]
    pruned = load_model(open_checkpoint(tmp_path / "out"))
    assert getattr(pruned.config, arch.n_layers) == len(encoder_layers(pruned, arch)) == len(kept) == 1
    enc = load_tokenizer(src)(texts[:6], padding=True, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if model_type != "distilbert" or k != "token_type_ids"}
    with torch.no_grad():
        got = pruned(**enc).logits
    torch.testing.assert_close(got, _masked(load_model(open_checkpoint(src)), enc, kept), atol=1e-5, rtol=1e-4)


def test_old_pruning_records_reload_and_a_layer_count_mismatch_is_named(deep, tmp_path):
    ckpt, calib = deep
    out = tmp_path / "heads"
    prune(ckpt, out, PruneConfig(heads=0.25), calibration_data=calib)
    texts, _ = _rows(calib)
    enc = load_tokenizer(out)(texts[:16], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = load_model(open_checkpoint(out))(**enc).logits
    spec = json.loads((out / PRUNING_FILE).read_text())
    del spec["kept_layers"]  # as edgekit wrote it before layers could be removed
    (out / PRUNING_FILE).write_text(json.dumps({**spec, "schema_version": 1}))
    with torch.no_grad():
        torch.testing.assert_close(load_model(open_checkpoint(out))(**enc).logits, expected)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(EdgekitError, match="num_hidden_layers"):
        load_model(open_checkpoint(out))


def test_bad_layer_options_are_one_sentence_and_write_nothing(deep, tmp_path):
    ckpt, calib = deep
    cases = [(["--layers", "0"], "--layers must be at least 1"),
             (["--layers", str(LAYERS)], f"from 1 to {LAYERS - 1} for this {LAYERS}-layer model"),
             (["--depth"], "--depth needs --sparsity"),
             (["--depth", "--heads", "0.5"], "--depth needs --sparsity"),
             (["--depth", "--sparsity", "0.5", "--layers", "1"], "cannot be combined with --layers")]
    for args, words in cases:
        assert_user_error(run_cli("prune", ckpt, "-o", tmp_path / "out", *args, "--calibration-data", calib,
                                  expect=None), words)
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())
    with pytest.raises(EdgekitError, match="at least 1"):
        PruneConfig(layers=0)
    assert PruneConfig(layers=2).layers == 2  # alone, a valid target


def test_compress_prune_layers_end_to_end(deep, data_dir, tmp_path):
    import yaml

    ckpt, calib = deep
    recipe = yaml.safe_load(run_cli("compress", ckpt, "--prune-layers", "1", "--calibration-data", calib,
                                    "--dump-recipe").stdout)
    assert recipe["prune"]["layers"] == 1 and recipe["prune"]["sparsity"] is None  # --prune-layers alone
    before = tree_digest(ckpt)
    r = run_cli("compress", ckpt, "-o", tmp_path / "run", "--prune-layers", "1", "--calibration-data", calib,
                "--data", data_dir / "eval.tsv", "--no-bench", "--json")
    report = json.loads(r.stdout)
    assert report["passed"] and report["config"]["recipe"]["prune"]["layers"] == 1
    assert len(report["prune"]["removed_layers"]) == 1 and report["prune"]["flops_reduction"] == pytest.approx(0.25)
    assert json.loads((tmp_path / "run" / "pruned" / "config.json").read_text())["num_hidden_layers"] == 3
    assert report["verify"]["original"] == str(ckpt.resolve())  # the gate compares with the 4-layer original
    assert "encoder layers" in (tmp_path / "run" / "report.md").read_text()
    assert tree_digest(ckpt) == before
