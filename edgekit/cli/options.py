"""Click options derived from the stage configs (``edgekit.options``): no option is written twice.

``config_options(QuantizeConfig, "quantize")`` gives one Click option per field of the config, with the
field's default, constraints, help and spelling; each option remembers the config field it fills and its
recipe key, so that a command builds its configs with :func:`build` and ``--dump-recipe`` knows, for every
option given on the command line, which recipe key it sets (``edgekit.cli.recipe``). A command chooses which
fields it exposes (``only``/``exclude``) and may prefix them (compress: ``--bench-iterations``), but never
restates a type, default or help text.

Imports click and pydantic only (``edgekit --help`` stays light).
"""

from __future__ import annotations

import types
import typing

import click


class ConfigOption(click.Option):
    """A Click option that fills ``config.field`` and sets ``recipe_key`` in a recipe."""

    def __init__(self, *args, config=None, field=None, recipe_key=None, split=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.config, self.field, self.recipe_key, self.split = config, field, recipe_key, split

    def config_value(self, value):
        """The parsed value as the config field takes it: a repeatable option's values, comma-separated too."""
        if self.split:
            return [x.strip() for v in value or () for x in str(v).split(",") if x.strip()]
        return list(value) if isinstance(value, tuple) else value


def _unwrap(annotation):
    """(base type, is Optional) of a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else annotation), True
    return annotation, False


def _bounds(field_info):
    lo = hi = None
    lo_open = False
    for m in field_info.metadata:
        if getattr(m, "ge", None) is not None:
            lo = m.ge
        if getattr(m, "gt", None) is not None:
            lo, lo_open = m.gt, True
        if getattr(m, "le", None) is not None:
            hi = m.le
    return lo, hi, lo_open


class Fraction(click.ParamType):
    """'10%' or '0.1' -> 0.1 (fields declared with ``fraction=True``)."""

    name = "fraction"

    def convert(self, value, param, ctx):
        from edgekit.options import parse_fraction

        try:
            return parse_fraction(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _click_type(config, name, base):
    meta = config.meta(name)
    info = config.model_fields[name]
    if meta.get("fraction"):
        return Fraction()
    if typing.get_origin(base) is typing.Literal:
        return click.Choice([str(v) for v in typing.get_args(base)])
    if meta.get("choices"):
        return click.Choice(meta["choices"]())
    lo, hi, lo_open = _bounds(info)
    if meta.get("between"):  # a range declared with option(between=...): Click states it too
        (lo, hi), lo_open = meta["between"], bool(meta.get("low_open"))
    if base is int:
        return click.IntRange(lo, hi) if lo is not None or hi is not None else click.INT
    if base is float:
        return click.FloatRange(lo, hi, min_open=lo_open) if lo is not None or hi is not None else click.FLOAT
    if meta.get("path"):
        return click.Path()
    return click.STRING


def option_for(config, name: str, section: str | None, prefix: str = "", flag: str | None = None) -> ConfigOption:
    """The Click option of one config field."""
    info = config.model_fields[name]
    meta = config.meta(name)
    base, optional = _unwrap(info.annotation)
    param = f"{prefix}{name}"
    spelled = flag or meta.get("flag") or f"--{prefix.replace('_', '-')}{name.replace('_', '-')}"
    if prefix and not flag and "/" in spelled:  # a prefixed boolean pair: --bench-x/--bench-no-x
        on, off = spelled.split("/")
        spelled = f"--{prefix.replace('_', '-')}{on[2:]}/--{prefix.replace('_', '-')}{off[2:]}"
    default = None if info.default_factory is not None else info.default
    key = config.recipe_fields().get(name)
    recipe_key = name if meta.get("run_wide") else (f"{section}.{key}" if section and key else None)
    kwargs = dict(help=info.description or None, config=config, field=name, recipe_key=recipe_key)
    if base is bool:
        if "/" in spelled or default is None or default is True:
            if "/" not in spelled:
                spelled = f"{spelled}/--no-{spelled[2:]}"
            return ConfigOption([spelled, param], default=default, show_default=default is not None, **kwargs)
        return ConfigOption([spelled, param], is_flag=True, default=False, **kwargs)
    if typing.get_origin(base) is list:
        return ConfigOption([spelled, param], multiple=True, split=True, metavar=meta.get("metavar"), **kwargs)
    return ConfigOption([spelled, param], type=_click_type(config, name, base), default=default,
                        show_default=default not in (None, ""), metavar=meta.get("metavar"), **kwargs)


def config_options(config, section: str | None = None, *, only=None, exclude=(), prefix: str = "",
                   flags: dict | None = None, run_wide: bool = True):
    """A decorator adding the Click options of ``config``'s fields (those with ``cli`` set) to a command.

    ``section``: the recipe section the config is (None: the command's options are not recipe keys);
    ``run_wide=False`` leaves out the run-wide fields (a command takes ``--task``/``--threads`` once).
    """
    flags = flags or {}
    names = [n for n in (only or config.model_fields) if n not in exclude and config.meta(n).get("cli", True)
             and (run_wide or not config.meta(n).get("run_wide"))]
    opts = [option_for(config, n, section, prefix, flags.get(n)) for n in names]

    def apply(f):
        # What click's own @option does: parameters collect on the function, in reverse (decorators apply
        # bottom-up), and @command reverses them back.
        params = f.__dict__.setdefault("__click_params__", [])
        params.extend(reversed(opts))
        return f

    return apply


def build(config, params: dict, prefix: str = "", **fixed):
    """``config`` from a command's parameters (the ones its :func:`config_options` added), plus ``fixed``.

    Options the command did not expose keep the config's defaults.
    """
    ctx = click.get_current_context(silent=True)
    options = {p.name: p for p in ctx.command.params if isinstance(p, ConfigOption)} if ctx else {}
    values = {}
    for name in config.model_fields:
        key = f"{prefix}{name}"
        if key in params:
            values[name] = options[key].config_value(params[key]) if key in options else params[key]
    values.update(fixed)
    return config(**values)
