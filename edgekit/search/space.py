"""What ``edgekit search`` may change in a recipe: one declarative table per model kind.

A dimension is a dotted recipe key (the same keys a recipe file and ``--dump-recipe`` use), the values it may
take, and when it applies (static-only options only with ``quantize.mode: static``; distillation only when
something was pruned). A point of the space is a dict of dimension values; :func:`recipe_of` turns it into a
full ``CompressConfig`` (the base recipe the user's options make, with those keys set), and :func:`recipe_key`
hashes the parts of that recipe that change the produced model, which is what ``--resume`` and the stage cache
key on. Choices are plain scalars because Optuna's categorical distributions take only those.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

from edgekit.errors import EdgekitError

# Sections of a recipe that decide the model a trial produces (bench, verify and gate are the same for every
# trial of a search, and are part of the search's identity instead).
MODEL_SECTIONS = ("prune", "export", "quantize")
NONE = "none"  # how "off" is spelled among a dimension's choices (Optuna's categorical choices are scalars)


def _always(point: dict) -> bool:
    return True


@dataclass(frozen=True)
class Dimension:
    key: str  # the dotted recipe key it sets
    choices: tuple  # scalars (str, int, float, bool); NONE for "not set"
    when: Callable[[dict], bool] = _always  # applies given the choices made before it
    needs: str = ""  # "calibration": only when calibration text was given
    # choice -> recipe value, where the recipe holds something Optuna cannot (a list)
    to_recipe: Callable[[object], object] | None = None
    help: str = ""
    # (low, high, step): the sampler models it as an ordered number (0 meaning NONE) rather than as unordered
    # choices, so TPE learns "more sparsity, less accuracy"; the grid and a --space override use ``choices``
    numeric: tuple | None = None

    def value(self, choice):
        if self.to_recipe is not None:
            return self.to_recipe(choice)
        return None if choice == NONE else choice


def _pruned(p: dict) -> bool:
    return p.get("prune.sparsity", NONE) != NONE or p.get("prune.layers", NONE) != NONE


def _static(p: dict) -> bool:
    return p.get("quantize.mode") == "static"


def _dynamic_fused(p: dict) -> bool:
    return p.get("quantize.mode") == "dynamic" and p.get("quantize.optimize") is not False


def _op_types(choice) -> list:
    return [] if choice == NONE else [choice]


ENCODER_SPACE = (
    Dimension("prune.sparsity", (NONE, 0.2, 0.3, 0.4, 0.5, 0.6), needs="calibration", numeric=(0.0, 0.6, 0.05),
              help="fraction of encoder FLOPs removed (heads and FFN neurons, Fisher-ranked)"),
    Dimension("prune.layers", (NONE, 1, 2), needs="calibration", numeric=(0, 2, 1), help="whole encoder layers removed"),
    # Not searched unless asked (--space prune.recover_steps=0,100): measured on all-MiniLM-L6-v2/SST-2, distilling
    # on the few hundred calibration sentences overfits them (dev drop 4.0 points at 60% sparsity, 1.8 without)
    Dimension("prune.recover_steps", (0,), when=_pruned, help="distillation steps after the re-fit"),
    Dimension("quantize.mode", ("dynamic", "static"), help="INT8 dynamic or static (calibrated)"),
    # On a CPU the QOperator form (QLinearMatMul) is the static candidate; QDQ is TensorRT's form and ran
    # several times slower than dynamic INT8 on onnxruntime's CPU provider.
    Dimension("quantize.format", ("qoperator",), when=_static, needs="calibration", help="static graph form"),
    Dimension("quantize.calibration_method", ("minmax", "entropy", "percentile"), when=_static,
              needs="calibration", help="static range estimator"),
    Dimension("quantize.per_channel", (True, False), help="weight scales per output channel or per tensor"),
    Dimension("quantize.optimize", (True, False), help="onnxruntime's transformer fusion before quantizing"),
    Dimension("quantize.exclude_op_types", (NONE, "Attention"), when=_dynamic_fused, to_recipe=_op_types,
              help="fused attention kept in float"),
)

DECODER_SPACE = (
    Dimension("quantize.bits", (4, 8), help="weight-only INT4 blocks or dynamic INT8"),
    Dimension("quantize.block_size", (32, 64, 128), when=lambda p: p.get("quantize.bits") == 4,
              help="INT4 block size"),
    Dimension("quantize.lm_head", ("8", "float", "4"), when=lambda p: p.get("quantize.bits") == 4,
              help="bits of the lm_head"),
    Dimension("quantize.embeddings", ("4", "float"), when=lambda p: p.get("quantize.bits") == 4,
              help="the token embedding at 4 bits or in float"),
    Dimension("quantize.method", ("rtn", "awq", "imatrix"), when=lambda p: p.get("quantize.bits") == 4,
              needs="calibration", help="round to nearest, NNCF's AWQ + scale estimation, or block scales searched "
                                        "against the input channels' importance"),
)


@dataclass
class Space:
    """The dimensions of one search, after the user's ``--space`` overrides and what the inputs allow."""

    dimensions: list[Dimension]
    notes: list[str] = field(default_factory=list)  # why a dimension was narrowed or dropped

    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    def describe(self) -> dict:
        return {d.key: ({"from": d.numeric[0], "to": d.numeric[1], "step": d.numeric[2]} if d.numeric
                        else list(d.choices)) for d in self.dimensions}


def parse_overrides(items) -> dict[str, tuple]:
    """``--space KEY=V1,V2`` items -> {key: choices}; values parsed as YAML scalars (``0.4``, ``true``, ``none``)."""
    import yaml

    # A list option's values arrive comma-split (``--space a=1,2`` -> "a=1", "2"): a piece without "=" is one
    # more value of the key before it.
    joined: list[str] = []
    for item in items or ():
        item = str(item)
        if "=" not in item and joined and "=" in joined[-1]:
            joined[-1] += "," + item
        else:
            joined.append(item)
    out = {}
    for item in joined:
        key, sep, values = str(item).partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise EdgekitError(f"--space {item!r} is not KEY=VALUE[,VALUE...]",
                               "write e.g. --space prune.sparsity=0,0.4,0.5 or --space quantize.mode=dynamic")
        choices = []
        for raw in values.split(","):
            v = yaml.safe_load(raw.strip())
            if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0
                             and key in ("prune.sparsity", "prune.layers")):
                v = NONE  # 0, null and none all mean "not pruned"
            if isinstance(v, str) and v.lower() in (NONE, "null", "off"):
                v = NONE
            if not isinstance(v, (str, int, float, bool)):
                raise EdgekitError(f"--space {key}: {raw.strip()!r} is not a single value", "give scalars only")
            choices.append(v)
        out[key] = tuple(dict.fromkeys(choices))
    return out


def _as_choices(d: Dimension, values: tuple) -> tuple:
    """Override values in the dimension's own types: ``--space quantize.lm_head=8`` means the choice "8"."""
    known = {str(c).lower(): c for c in d.choices}
    strings = all(isinstance(c, str) for c in d.choices)
    return tuple(known.get(str(v).lower(), str(v) if strings else v) for v in values)


def build_space(decoder: bool, calibration: bool, overrides: dict[str, tuple], max_layers: int | None = None,
                prunable: bool = True) -> Space:
    """The dimensions for this model kind, narrowed by ``overrides`` and by what the inputs allow
    (``calibration``: calibration text was given; ``prunable``: the family is in the pruning table)."""
    table = DECODER_SPACE if decoder else ENCODER_SPACE
    known = {d.key: d for d in table}
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise EdgekitError(f"--space {unknown[0]} is not a dimension of a {'decoder' if decoder else 'encoder'} "
                           "search", "dimensions: " + ", ".join(known))
    dims, notes = [], []
    for d in table:
        choices = _as_choices(d, overrides[d.key]) if d.key in overrides else d.choices
        if d.key.startswith("prune.") and not prunable:
            if d.key in overrides and any(c not in (NONE, 0) for c in choices):
                raise EdgekitError(f"--space {d.key}: this model family has no structured pruning in edgekit",
                                   "search quantization alone (drop the prune.* dimensions)")
            continue
        if d.needs == "calibration" and not calibration:
            off = tuple(c for c in choices if c in (NONE, 0) or (d.key == "quantize.method" and c == "rtn"))
            if d.key in overrides and len(off) < len(choices):
                raise EdgekitError(f"--space {d.key} needs calibration text", "pass --calibration-data FILE "
                                   "(training examples, not the evaluation set)")
            if len(off) < len(choices) and d.when is _always:  # a conditional one follows its condition's note
                notes.append(f"{d.key} not searched: it needs --calibration-data")
            if not off:
                continue
            choices = off
        if d.key == "quantize.mode" and not calibration:
            if "static" in choices and d.key in overrides:
                raise EdgekitError("--space quantize.mode=static needs calibration text",
                                   "pass --calibration-data FILE")
            if "static" in choices:
                notes.append("static INT8 not searched: it needs --calibration-data")
            choices = tuple(c for c in choices if c != "static")
        if d.key == "prune.layers" and max_layers is not None:
            too_many = [c for c in choices if c != NONE and c >= max_layers]
            if too_many and d.key in overrides:
                raise EdgekitError(f"--space prune.layers={too_many[0]} leaves no layer of {max_layers}",
                                   f"remove at most {max_layers - 1}")
            choices = tuple(c for c in choices if c == NONE or c < max_layers)
        if not choices:
            raise EdgekitError(f"--space {d.key} leaves no value to try", "give at least one value")
        numeric = d.numeric if d.key not in overrides and d.choices == choices else None
        dims.append(Dimension(d.key, tuple(choices), d.when, d.needs, d.to_recipe, d.help, numeric))
    return Space(dims, notes)


def point_values(space: Space, point: dict) -> dict:
    """A point's recipe values: dotted key -> value, the dimensions that do not apply left out."""
    out = {}
    for d in space.dimensions:
        if d.key in point:
            out[d.key] = d.value(point[d.key])
    return out


def recipe_of(base, space: Space, point: dict):
    """The ``CompressConfig`` of a point: the base recipe with the point's keys set (no prune section when
    nothing is pruned)."""
    from edgekit.recipe import with_values

    values = point_values(space, point)
    if values.get("prune.sparsity") is None and values.get("prune.layers") is None:
        values = {k: v for k, v in values.items() if not k.startswith("prune.")}
        values["prune"] = None
    elif any(k.startswith("prune.") for k in values):
        # a prune section of the base recipe lends its other settings; its own target is the trial's
        values = {"prune.sparsity": None, "prune.layers": None, "prune.heads": None, "prune.ffn": None,
                  "prune.depth": False, **values}
    return with_values(base, values)


def recipe_key(recipe) -> str:
    """A short hash of what makes the model of a recipe (its prune, export and quantize sections)."""
    data = recipe.to_recipe() if hasattr(recipe, "to_recipe") else recipe
    model = {k: data.get(k) for k in MODEL_SECTIONS}
    return hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_point(point: dict) -> str:
    """One line for the progress output: 'prune 0.4 + 1 layer, dynamic per-tensor'."""
    parts = []
    if point.get("prune.sparsity", NONE) != NONE:
        parts.append(f"prune {point['prune.sparsity']:.0%}")
    if point.get("prune.layers", NONE) != NONE:
        n = point["prune.layers"]
        parts.append(f"-{n} layer{'s' * (n != 1)}")
    if point.get("prune.recover_steps"):
        parts.append(f"distil {point['prune.recover_steps']}")
    if "quantize.bits" in point:
        if point["quantize.bits"] == 4:
            parts.append(f"INT4 b{point.get('quantize.block_size')} {point.get('quantize.method', 'rtn')}"
                         f" head {point.get('quantize.lm_head')} emb {point.get('quantize.embeddings')}")
        else:
            parts.append("INT8 dynamic")
    if "quantize.mode" in point:
        q = point["quantize.mode"]
        if q == "static":
            q += f" {point.get('quantize.format', 'qdq')} {point.get('quantize.calibration_method', 'minmax')}"
        q += " per-channel" if point.get("quantize.per_channel", True) else " per-tensor"
        if point.get("quantize.optimize") is False:
            q += " unfused"
        if point.get("quantize.exclude_op_types", NONE) != NONE:
            q += f" {point['quantize.exclude_op_types']} float"
        parts.append(q)
    return ", ".join(parts) or "default"
