"""A model's command line, made from its config dataclass: one source for the flags, their
defaults and help, the checks, the presets and the command that reproduces a run.

    ganforge train MODEL [--preset NAME] [--config FILE] [--FLAG VALUE ...] --out DIR

Every field of the config (a `RunConfig` subclass, see task.py) is a flag, `--field-name`;
the fields of its nested `network` dataclass are flags too (`--ngf`). Values are taken, last
wins, from: the dataclass defaults, the preset (`training/presets/MODEL/NAME.toml`), the file
given with `--config` (TOML or JSON, the same keys), and the flags typed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from ganforge.errors import UsageError

PRESETS = Path(__file__).parent / "presets"


def comma_ints(flag: str, example: str):
    """The `parse` of an option holding integers written `1,2,4` (its `format` is `join_ints`)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            raise UsageError(f"{flag}: {text!r} is not allowed; must be integers separated by commas, "
                             f"e.g. {example}") from None
    return parse


def join_ints(values) -> str:
    return ",".join(str(v) for v in values)


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_config(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def options(cls, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dataclasses.Field, Any]]:
    """(path, field, type) of every command-line option of a config class, nested configs
    flattened (the network's fields: path ('network', 'ngf'))."""
    out = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_config(tp) and "parse" not in f.metadata:
            out += options(tp, prefix + (f.name,))
        elif f.metadata.get("cli", True) is not False:
            out.append((prefix + (f.name,), f, tp))
    return out


def flag(path: tuple[str, ...], f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + path[-1].replace("_", "-")


def _base(tp):
    """(scalar type, optional, tuple length or 0) of an annotation."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        return args[0], optional, len(args)
    return tp, optional, 0


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def add_options(parser: argparse.ArgumentParser, cls, title: str = "options") -> None:
    """Add a flag per option, with default SUPPRESS: only what the user typed is set."""
    group = parser.add_argument_group(title)
    for path, f, tp in options(cls):
        base, optional, n = _base(tp)
        d = _default(f)
        shown = f.metadata.get("show", d)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default {shown})" if help_text else f"(default {shown})"
        kw: dict = {"dest": ".".join(path), "default": argparse.SUPPRESS, "help": help_text}
        if base is not bool:
            kw["metavar"] = path[-1].upper()
        if "parse" in f.metadata:
            kw["metavar"] = f.metadata.get("metavar", "TEXT")
            group.add_argument(flag(path, f), type=str, **kw)
        elif base is bool:
            group.add_argument(flag(path, f), action=argparse.BooleanOptionalAction, **kw)
        else:
            if n:
                kw["nargs"] = n
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            group.add_argument(flag(path, f), type=base, **kw)


def _set(d: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        d = d.setdefault(k, {})
    d[path[-1]] = value


def typed_values(cls, values: dict) -> dict:
    """Flat dotted flag values (from argparse) -> nested dict of config values."""
    out: dict = {}
    fields = {".".join(p): (f, tp) for p, f, tp in options(cls)}
    for key, value in values.items():
        if key not in fields:
            continue
        f, tp = fields[key]
        if "parse" in f.metadata:
            value = f.metadata["parse"](value)
        elif _base(tp)[2]:
            value = tuple(value)
        _set(out, tuple(key.split(".")), value)
    return out


def build(cls, values: dict, source: str = "config"):
    """A config of class `cls` from nested `values`; unknown keys are refused by name."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UsageError(f"{source}: {key!r} is not an option of {cls.__name__}; allowed: "
                             f"{', '.join(sorted(known))}")
        tp = hints[key]
        f = known[key]
        if _is_config(tp) and isinstance(value, dict):
            value = build(tp, value, source)
        elif "parse" in f.metadata and isinstance(value, str):
            value = f.metadata["parse"](value)
        elif _is_config(tp) and isinstance(value, dict) is False and not dataclasses.is_dataclass(value):
            raise UsageError(f"{source}: {key!r} must be a table of {tp.__name__} options")
        elif _base(tp)[2] and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{source}: {exc}") from None


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_file(path: str | Path, source: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{source}: {p} does not exist")
    text = p.read_text()
    try:
        return json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{source}: {p} is not valid {'JSON' if p.suffix == '.json' else 'TOML'} ({exc})") from None


def preset_names(model: str) -> list[str]:
    return sorted(p.stem for p in (PRESETS / model).glob("*.toml"))


def preset(model: str, name: str) -> dict:
    """A named preset's values (its description removed)."""
    path = PRESETS / model / f"{name}.toml"
    if not path.is_file():
        raise UsageError(f"--preset: {name!r} is not a preset of {model}; allowed: "
                         f"{', '.join(preset_names(model)) or 'none'}")
    values = read_file(path, "--preset")
    values.pop("description", None)
    return values


def config_from(cls, model: str, preset_name: str | None = None, config_file: str | None = None,
                overrides: dict | None = None):
    """Defaults < preset < --config file < flags (`overrides`, nested)."""
    values: dict = {}
    if preset_name:
        values = merge(values, preset(model, preset_name))
    if config_file:
        extra = read_file(config_file, "--config")
        extra.pop("description", None)
        values = merge(values, extra)
    values = merge(values, overrides or {})
    cfg = build(cls, values, f"--preset {preset_name}" if preset_name and not overrides else "config")
    cfg.check()
    return cfg


def check_config(cfg) -> None:
    """Each option's `min`, `max`, `below` and `choices`: a UsageError naming the flag, the
    value and what is allowed."""
    for path, f, tp in options(type(cfg)):
        value = cfg
        for k in path:
            value = getattr(value, k)
        name = flag(path, f)
        m = f.metadata
        vals = value if isinstance(value, tuple) else (value,)
        for v in vals:
            if v is None:
                continue
            if m.get("choices") and v not in m["choices"]:
                raise UsageError(f"{name}: {v!r} is not allowed; must be one of {', '.join(map(str, m['choices']))}")
            if m.get("min") is not None and v < m["min"]:
                raise UsageError(f"{name}: {v!r} is not allowed; must be >= {m['min']}")
            if m.get("max") is not None and v > m["max"]:
                raise UsageError(f"{name}: {v!r} is not allowed; must be <= {m['max']}")
            if m.get("below") is not None and v >= m["below"]:
                raise UsageError(f"{name}: {v!r} is not allowed; must be < {m['below']}")
        if isinstance(value, tuple) and len(value) == 2 and m.get("ordered") and value[0] > value[1]:
            raise UsageError(f"{name}: {value[0]} {value[1]} is not allowed; the first must not exceed the second")
    own = getattr(cfg, "validate", None)
    if own:
        own()


def command_line(model: str, cls, train: dict, out: str | Path) -> str:
    """The `ganforge train` command that reproduces a run from its recorded settings: every
    option explicit (later changes of defaults do not change it); where the engine's device and
    precision were chosen automatically, they stay automatic."""
    parts = ["ganforge", "train", model]
    for path, f, tp in options(cls):
        if path[0] in ("device", "precision", "workers", "threads"):
            continue                          # where it runs, not what it trains
        value: Any = train
        try:
            for k in path:
                value = value[k]
        except (KeyError, TypeError):
            continue                          # a run from before the option existed
        base, _, n = _base(tp)
        name = flag(path, f)
        if "parse" in f.metadata:
            text = f.metadata.get("format", lambda v: None)(value)
            if text:
                parts += [name, text]
        elif base is bool:
            parts.append(name if value else "--no-" + name[2:])
        elif value is None:
            continue
        elif n:
            parts += [name, *(str(v) for v in value)]
        else:
            parts += [name, str(value)]
    return " ".join(parts + ["--out", str(out)])


def train_command(kind: str, train: dict, out: str | Path) -> str:
    """The full `ganforge train` command line that reproduces a run from its recorded settings:
    every flag explicit, so later changes of defaults do not change what it means."""
    from ganforge.training import models, options

    if kind in models.REGISTRY:
        return options.command_line(kind, models.get(kind).config, train, out)
    raise ValueError(f"no train command for kind {kind!r}")
