"""The package's shape: no import circles (counting imports inside functions too), and each option declared once."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "edgekit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """edgekit module -> the edgekit modules it imports anywhere in its body (module level or in a function)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from edgekit.x import y` imports edgekit.x.y when y is a module, else edgekit.x itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "modules that import each other (directly or round a loop): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_cli_helpers_import_no_command():
    commands = {m for m in import_graph() if m.startswith("edgekit.cli.")} - {"edgekit.cli.common", "edgekit.cli.options"}
    graph = import_graph()
    assert not graph["edgekit.cli.common"] & commands and not graph["edgekit.cli.options"] & commands


def test_a_new_config_field_reaches_the_cli_and_the_recipe():
    """Add one field to QuantizeConfig: it becomes a command-line option and a recipe key with no other change."""
    code = textwrap.dedent('''
        from typing import Optional
        from edgekit.compress.quantize import QuantizeConfig
        from edgekit.options import option
        QuantizeConfig.model_fields["new_knob"] = option(7, "A knob added in a test.", ge=1)
        QuantizeConfig.model_fields["new_knob"].annotation = int
        QuantizeConfig.model_rebuild(force=True)
        import edgekit.pipeline
        edgekit.pipeline.CompressConfig.model_rebuild(force=True)
        from click.testing import CliRunner
        from edgekit.cli import main
        r = CliRunner().invoke(main, ["quantize", "--help"])
        assert "--new-knob" in r.output and "A knob added in a test." in r.output, r.output
        r = CliRunner().invoke(main, ["compress", "ckpt", "--new-knob", "3", "--dump-recipe"])
        assert r.exit_code == 0, r.output
        import yaml
        assert yaml.safe_load(r.output)["quantize"]["new_knob"] == 3, r.output
        r = CliRunner().invoke(main, ["compress", "ckpt", "--new-knob", "0", "--dump-recipe"])
        assert r.exit_code == 2 and "x>=1" in r.output, r.output
        print("ok")
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout + out.stderr


def test_no_option_is_declared_twice():
    """Every config-backed option of every command comes from a config field; no two commands spell one field
    with different help texts (they would have been written twice)."""
    from edgekit.cli import main
    from edgekit.cli.options import ConfigOption

    seen = {}

    def walk(group):
        for cmd in group.commands.values():
            if hasattr(cmd, "commands"):
                walk(cmd)
                continue
            for p in cmd.params:
                if isinstance(p, ConfigOption):
                    key = (p.config.__name__, p.field)
                    assert seen.setdefault(key, p.help) == p.help, key

    walk(main)
    assert ("QuantizeConfig", "mode") in seen and ("BenchConfig", "iterations") in seen
    assert ("PruneConfig", "sparsity") in seen and ("GateConfig", "max_drop") in seen


def test_readme_layout_matches_the_tree():
    import re

    readme = (PACKAGE.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("- Layout, one line per package", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    listed = {m.rstrip("/") for m in re.findall(r"^(edgekit/[a-z_]*/?)\s", block, re.M)}
    packages = {"edgekit"} | {f"edgekit/{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert listed == packages, f"README lists {sorted(listed)}, the tree has {sorted(packages)}"
    top_modules = {p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("_")}
    first = block.split("edgekit/cli/", 1)[0]
    named = set(re.findall(r"([a-z_]+)\.py", first))
    assert named == top_modules, f"README names {sorted(named)}, edgekit/ holds {sorted(top_modules)}"
