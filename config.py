"""
Plain configuration: dataclass sections filled from a TOML file and `--section.key=value` overrides,
checked strictly. A file is data, never executed; an unknown section or key, or a value of the wrong
type, stops with a message that names it (and the nearest known name). Knows nothing of the project:
train.py gives it the sections.
"""

import dataclasses
import difflib
import os
import tomllib


class ConfigError(ValueError):
    """A config file or override that cannot work; the message names the key."""


def _coerce(section, key, value, typ, from_cli):
    """Check (file) or parse (command line) a value against the dataclass field's type."""
    where = f"{section}.{key}"
    if from_cli:
        try:
            if typ is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return typ(value)
        except ValueError:
            raise ConfigError(f"{where}={value!r}: expected a {typ.__name__}") from None
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True  # 1 is a fine float
    if not ok:
        raise ConfigError(f"{where} = {value!r} is a {type(value).__name__}, expected a {typ.__name__}")
    return value


def _set(cfgs, sections, derived, section, key, value, from_cli):
    if section not in sections:
        hint = difflib.get_close_matches(section, sections, n=1)
        raise ConfigError(f"unknown config section [{section}]"
                          + (f"; did you mean [{hint[0]}]?" if hint else f"; sections: {', '.join(sections)}"))
    types = {f.name: f.type for f in dataclasses.fields(sections[section])}
    if key not in types:
        hint = difflib.get_close_matches(key, types, n=1)
        raise ConfigError(f"unknown config key {section}.{key}"
                          + (f"; did you mean {section}.{hint[0]}?" if hint else ""))
    if (section, key) in derived:
        raise ConfigError(f"{section}.{key} is derived from the other settings; it cannot be set")
    setattr(cfgs[section], key, _coerce(section, key, value, types[key], from_cli))


def load(path, sections, overrides=(), derived=()):
    """A TOML file (or None) plus `section.key=value` overrides -> {section: dataclass instance}.
    sections: {name: dataclass}; derived: (section, key) pairs computed by the caller, never set."""
    cfgs = {name: cls() for name, cls in sections.items()}
    if path is not None:
        if not os.path.exists(path):
            raise ConfigError(f"config file {path} not found (the shipped ones are in tiny_configs/)")
        with open(path, "rb") as f:
            try:
                raw = tomllib.load(f)
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{path} is not valid TOML: {e}") from None
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section]")
            for key, value in table.items():
                _set(cfgs, sections, derived, section, key, value, from_cli=False)
    for item in overrides:
        name, eq, value = item.lstrip("-").partition("=")
        section, dot, key = name.partition(".")
        if not eq or not dot:
            raise ConfigError(f"override {item!r} must look like --section.key=value, e.g. --train.lm_steps=300")
        _set(cfgs, sections, derived, section, key, value, from_cli=True)
    return cfgs
