"""Recipes: validation that names the key, CLI overrides, --dump-recipe round trips, the example files."""

import json
import os
from pathlib import Path

import pytest
import yaml

from helpers import assert_user_error, read_json, run_cli

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def recipe_run(text_ckpt, data_dir, tmp_path_factory):
    """One recipe-driven compress: relative paths, a recipe-only field (opset) and a CLI override (--max-drop)."""
    root = tmp_path_factory.mktemp("recipe")
    (root / "project").mkdir()
    recipe = _write(root / "project" / "edgekit.yaml", f"""
checkpoint: {os.path.relpath(text_ckpt, root / 'project')}
export:
  opset: 17
data:
  eval: {os.path.relpath(data_dir / 'eval.tsv', root / 'project')}
  limit: 120
gates:
  max_drop: 2.0
bench: null
devices: [x86-cpu]
""")
    r = run_cli("compress", "--recipe", recipe, "--max-drop", "3", "-o", root / "run")
    return {"root": root, "recipe": recipe, "run": root / "run", "output": r.output}


def test_recipe_driven_compress(recipe_run, text_ckpt, data_dir):
    rep = read_json(recipe_run["run"] / "report.json")
    assert rep["passed"] and rep["bench"] is None
    assert rep["export"]["opset"] == 17  # a key with no compress option reached the run
    assert rep["verify"]["n_examples"] == 120
    assert rep["verify"]["config"]["gate"]["max_drop"] == 3.0  # the command line overrides the recipe
    recipe = rep["config"]["recipe"]
    # relative paths were resolved against the recipe's folder, not the working directory
    assert recipe["checkpoint"] == str(text_ckpt.resolve())
    assert recipe["data"]["eval"] == str((data_dir / "eval.tsv").resolve())
    assert recipe["gates"]["max_drop"] == 3.0 and recipe["devices"] == ["x86-cpu"]


def test_report_embeds_the_dumped_recipe(recipe_run):
    from edgekit.compress.quantize import default_reduce_range
    from edgekit.benchmarks.environment import usable_cores

    from edgekit.pipeline import resolve_paths
    from edgekit.recipe import PATH_FIELDS

    dumped = yaml.safe_load(run_cli("compress", "--recipe", recipe_run["recipe"], "--max-drop", "3",
                                    "--dump-recipe").stdout)
    dumped = resolve_paths(dumped, Path.cwd(), PATH_FIELDS)  # a stdout recipe is relative to the current folder
    ran = read_json(recipe_run["run"] / "report.json")["config"]["recipe"]
    # the dump leaves the machine's choices open; the run made them once and recorded them
    assert dumped["threads"] is None and dumped["quantize"]["reduce_range"] is None
    assert ran["threads"] == usable_cores() and ran["quantize"]["reduce_range"] == default_reduce_range()
    dumped["threads"], dumped["quantize"]["reduce_range"] = ran["threads"], ran["quantize"]["reduce_range"]
    assert dumped == ran


def test_dump_recipe_round_trip(text_ckpt, data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `--dump-recipe > dumped.yaml`: the file lands in the current folder
    first = run_cli("compress", text_ckpt, "-o", tmp_path / "never", "--data", data_dir / "eval.tsv", "--mode", "static",
                    "--exclude-nodes", "a,b", "--no-bench", "--max-drop", "0.5", "--dump-recipe").stdout
    assert not (tmp_path / "never").exists()  # nothing ran
    dumped = _write(tmp_path / "dumped.yaml", first)
    again = run_cli("compress", "--recipe", dumped, "--dump-recipe").stdout
    assert again == first
    r = yaml.safe_load(first)
    assert r["quantize"]["mode"] == "static" and r["quantize"]["exclude_nodes"] == ["a", "b"]
    assert r["bench"] is None and r["gates"]["max_drop"] == 0.5
    # an option given with --recipe wins; options not given keep the recipe's values
    over = yaml.safe_load(run_cli("compress", "--recipe", dumped, "--mode", "dynamic", "--dump-recipe").stdout)
    assert over["quantize"]["mode"] == "dynamic" and over["quantize"]["exclude_nodes"] == ["a", "b"]


def test_misspelled_key_is_named(tmp_path):
    bad = _write(tmp_path / "edgekit.yaml", "checkpoint: x\nquantise:\n  mode: static\n")
    line = assert_user_error(run_cli("compress", "--recipe", bad, "-o", tmp_path / "o", expect=2),
                             "edgekit.yaml", "unknown key 'quantise' at top level", "did you mean 'quantize'")
    assert not (tmp_path / "o").exists(), line
    nested = _write(tmp_path / "nested.yaml", "quantize:\n  mdoe: static\n")
    assert_user_error(run_cli("compress", "--recipe", nested, "--dump-recipe", expect=2),
                      "unknown key 'mdoe' in section 'quantize'", "did you mean 'mode'")


@pytest.mark.parametrize("text, fragment", [
    ("devices: [jetson-orin-nan-8gb]\n", "unknown device profile 'jetson-orin-nan-8gb'"),
    ("quantize:\n  mode: fast\n", "'quantize.mode'"),
    ("task: text-clasification\n", "did you mean 'text-classification'"),
    ("bench:\n  iterations: 0\n", "'bench.iterations'"),
    ("checkpoint: [unclosed\n", "not valid YAML at line"),
    ("- a list\n", "must be a mapping"),
])
def test_bad_recipes_are_user_errors(tmp_path, text, fragment):
    bad = _write(tmp_path / "r.yaml", text)
    assert_user_error(run_cli("compress", "--recipe", bad, "--dump-recipe", expect=2), fragment)


def test_compress_needs_a_checkpoint_and_an_output(tmp_path):
    empty = _write(tmp_path / "r.yaml", "bench: null\n")
    assert_user_error(run_cli("compress", "--recipe", empty, "-o", tmp_path / "o", expect=2), "needs a checkpoint")
    with_ckpt = _write(tmp_path / "c.yaml", f"checkpoint: {tmp_path}\n")
    r = run_cli("compress", "--recipe", with_ckpt, expect=2)
    assert "Missing option '-o' / '--output'" in r.output


def test_every_pipeline_command_dumps_its_recipe(recipe_run, text_ckpt, data_dir, tmp_path):
    run, eval_tsv = recipe_run["run"], data_dir / "eval.tsv"
    commands = {
        "export": ["export", text_ckpt, "-o", tmp_path / "e", "--opset", "17"],
        "quantize": ["quantize", run / "onnx", "-o", tmp_path / "q", "--mode", "static"],
        "verify": ["verify", text_ckpt, run / "int8", "--data", eval_tsv, "--max-drop", "4"],
        "bench": ["bench", text_ckpt, run / "int8", "--iterations", "7"],
        "demo": ["demo"],
        "release": ["release", "build", run, "-o", tmp_path / "dist"],
        "gate": ["gate", run, "--baseline", run],
    }
    for name, args in commands.items():
        r = yaml.safe_load(run_cli(*args, "--dump-recipe").stdout)
        assert r["recipe_version"] == 1, name
        if name not in ("demo",):
            assert (Path.cwd() / r["checkpoint"]).resolve() == text_ckpt.resolve(), name
    assert yaml.safe_load(run_cli(*commands["export"], "--dump-recipe").stdout)["export"]["opset"] == 17
    assert yaml.safe_load(run_cli(*commands["quantize"], "--dump-recipe").stdout)["quantize"]["mode"] == "static"
    assert yaml.safe_load(run_cli(*commands["bench"], "--dump-recipe").stdout)["bench"]["iterations"] == 7
    assert yaml.safe_load(run_cli(*commands["release"], "--dump-recipe").stdout)["export"]["opset"] == 17
    assert not any((tmp_path / d).exists() for d in ("e", "q", "dist"))


def test_stage_json_reports_embed_the_recipe(recipe_run, text_ckpt, data_dir):
    r = run_cli("verify", text_ckpt, recipe_run["run"] / "int8", "--data", data_dir / "eval.tsv", "--limit", "40", "--json")
    rep = json.loads(r.stdout)
    assert rep["recipe"]["checkpoint"] == str(text_ckpt.resolve()) and rep["recipe"]["data"]["limit"] == 40


def test_python_api_round_trip(text_ckpt, tmp_path):
    from edgekit.recipe import dump_recipe, load_recipe, recipe_from_compress_config

    recipe = load_recipe(_write(tmp_path / "r.yaml", f"checkpoint: {text_ckpt}\nquantize:\n  per_channel: false\n"))
    cfg = recipe  # a recipe is a CompressConfig: there is no conversion left to drift
    assert cfg.quantize.per_channel is False and cfg.to_recipe() == recipe.to_dict()
    back = recipe_from_compress_config(cfg, recipe.checkpoint)
    assert back.quantize == recipe.quantize and back.gate == recipe.gate and back.bench == recipe.bench
    assert load_recipe(_write(tmp_path / "d.yaml", dump_recipe(recipe))) == recipe


def test_example_recipe_validates():
    from edgekit.recipe import load_recipe

    recipe = load_recipe(ROOT / "examples" / "edgekit.yaml")  # paths need not exist; devices must be known
    assert recipe.checkpoint.endswith("models/sentiment-bert") and recipe.devices
    assert recipe.to_dict()["quantize"]["mode"] == "dynamic"


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_examples(name):
    text = (ROOT / "examples" / "ci" / name).read_text()
    assert isinstance(yaml.safe_load(text), dict)
    assert "edgekit compress --recipe edgekit.yaml" in text
    assert "edgekit gate run/report.json --baseline" in text and "--junit gate.xml" in text
    assert "--markdown gate.md" in text and "pip install torch==2.13.0" in text


def test_prune_section_is_never_silently_ignored(text_ckpt, data_dir, tmp_path):
    """compress runs the prune stage: a recipe's prune section reaches it (here it stops at once, asking
    for the calibration text it needs, before anything is written)."""
    recipe = _write(tmp_path / "r.yaml", f"checkpoint: {text_ckpt}\nprune:\n  sparsity: 0.4\n"
                                         f"data:\n  eval: {data_dir / 'eval.tsv'}\nbench: null\n")
    assert yaml.safe_load(run_cli("compress", "--recipe", recipe, "--dump-recipe").stdout)["prune"]["sparsity"] == 0.4
    assert_user_error(run_cli("compress", "--recipe", recipe, "-o", tmp_path / "o", expect=2), "--prune",
                      "calibration text")
    assert not (tmp_path / "o").exists()
