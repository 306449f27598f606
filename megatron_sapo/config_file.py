"""The TOML file of a training run: ``load_config`` reads a file plus ``--set section.key=value``
overrides, rejecting unknown keys and wrong types with the file and key in the message;
``dump_config`` writes a config back as TOML (a small writer: the standard library only reads
TOML, and the values here are only strings, numbers, booleans and lists of them).

Types come from the dataclass annotations of :mod:`megatron_sapo.config`, so a new field needs
no loader change. TOML has no null: an unset optional field is simply absent, which is also how
``dump_config`` writes it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Union, get_args, get_origin, get_type_hints

from megatron_sapo.config import ConfigError, RunConfig


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run's TOML file and apply ``section.key=value`` overrides (``--set``) on top.

    An override's value is parsed as a TOML value (``1.0``, ``true``, ``["a:1", "b:2"]``) and
    otherwise taken as a bare string (``data.train_path=x.jsonl``). Errors name the file (or the
    override) and the key."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    for item in overrides:
        _apply_override(raw, item)
    train = raw.setdefault("train", {})
    if isinstance(train, dict):
        train.setdefault("out_dir", str(Path("runs") / path.stem))
    return config_from_dict(raw, source=f"{path} (with --set overrides)" if overrides else str(path))


def config_from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Build a RunConfig from parsed TOML tables; errors start with ``source``."""
    for name in raw:
        _check_known_section(source, name)
    sections = {}
    for name, cls in _section_types().items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {name} must be a [{name}] table, got {table!r}")
        sections[name] = _build_section(source, name, cls, table)
    from megatron_sapo.data.checks import check_data

    try:
        cfg = RunConfig(**sections)
        check_data(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The config as TOML text that ``load_config`` reads back into an equal config."""
    lines: list[str] = []
    for name in _section_types():
        section = getattr(cfg, name)
        lines.append(f"[{name}]")
        for field in dataclasses.fields(section):
            value = getattr(section, field.name)
            if value is not None:
                lines.append(f"{field.name} = {_toml_value(f'{name}.{field.name}', value)}")
        lines.append("")
    return "\n".join(lines)


def _section_types() -> dict[str, type]:
    hints = get_type_hints(RunConfig)
    return {field.name: hints[field.name] for field in dataclasses.fields(RunConfig)}


def _check_known_section(source: str, name: str) -> None:
    sections = list(_section_types())
    if name not in sections:
        raise ConfigError(f"{source}: unknown section [{name}]{_did_you_mean(name, sections)}")


def _check_known_key(source: str, section: str, key: str) -> None:
    _check_known_section(source, section)
    keys = [field.name for field in dataclasses.fields(_section_types()[section])]
    if key not in keys:
        raise ConfigError(f"{source}: unknown key {section}.{key}{_did_you_mean(key, keys)}")


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(candidates)})"


def _build_section(source: str, name: str, cls: type, table: dict):
    hints = get_type_hints(cls)
    kwargs = {}
    for key, value in table.items():
        _check_known_key(source, name, key)
        kwargs[key] = _coerce(f"{source}: {name}.{key}", value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _coerce(where: str, value: object, hint: object) -> object:
    """``value`` checked against the field's annotation; ints become floats for float fields."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (Union, types.UnionType):
        return _coerce(where, value, args[0])  # only `X | None` is used, and TOML has no null
    if get_origin(hint) is Literal or hint is str:
        ok = isinstance(value, str)
    elif hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")
        return [_coerce(f"{where}[{i}]", item, args[0]) for i, item in enumerate(value)]
    elif dataclasses.is_dataclass(hint):  # a table inside a section ([[eval.sets]])
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        hints = get_type_hints(hint)
        known = [field.name for field in dataclasses.fields(hint)]
        for key in value:
            if key not in known:
                raise ConfigError(f"{where}: unknown key {key}{_did_you_mean(key, known)}")
        missing = [f.name for f in dataclasses.fields(hint)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in value]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        try:
            return hint(**{key: _coerce(f"{where}.{key}", item, hints[key]) for key, item in value.items()})
        except ConfigError as err:
            source = where.rsplit(": ", 1)[0]
            raise ConfigError(str(err) if str(err).startswith(source) else f"{source}: {err}") from None
    else:
        raise TypeError(f"{where}: the loader has no rule for fields of type {hint}")
    if not ok:
        raise ConfigError(f"{where} must be {_describe(hint)}, got {value!r}")
    return value


_TYPE_NAMES = {str: ("a string", "strings"), bool: ("true or false", "booleans"), int: ("an integer", "integers"),
               float: ("a number", "numbers")}


def _describe(hint: object) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if get_origin(hint) is list:
        item = get_args(hint)[0]
        return "a list of " + ("tables" if dataclasses.is_dataclass(item) else _TYPE_NAMES[item][1])
    return _TYPE_NAMES[hint][0]


def _apply_override(raw: dict, item: str) -> None:
    source = f"--set {item}"
    dotted, sep, text = item.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not (sep and dot and section and key) or "." in key:
        raise ConfigError(f"{source}: expected section.key=value (e.g. loss.tau_neg=1.05)")
    _check_known_key(source, section, key)
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        value = text
    _coerce(f"{source}: {section}.{key}", value, get_type_hints(_section_types()[section])[key])  # checked here,
    table = raw.setdefault(section, {})  # built with the rest of the file (tables in a list stay tables)
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: {section} is not a table in the config file")
    table[key] = value


def _toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(key, item) for item in value) + "]"
    if dataclasses.is_dataclass(value):  # an inline table
        items = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return "{" + ", ".join(f"{name} = {_toml_value(f'{key}.{name}', item)}" for name, item in items
                               if item is not None) + "}"
    raise TypeError(f"{key}: cannot write a {type(value).__name__} to TOML")


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:  # other control characters must be escaped
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
