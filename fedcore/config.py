"""Reading TOML config files into frozen objects, with errors that name file, key, value.

Config is loaded once, at the process edge (``__main__`` / CLI), never below it. Each
service builds its own frozen dataclasses from a :class:`Section`; a wrong or missing value
raises :class:`~fedcore.errors.ConfigError` naming the file, the dotted key and the value.
Unknown keys are errors too: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import builtins
import math
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fedcore.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


def load_toml(path: str | Path) -> Section:
    """Parse a TOML file into a root :class:`Section`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), "<file>", str(p), f"cannot read: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), "<file>", str(p), f"not valid TOML: {exc}") from exc
    return Section(str(p), "", data)


class Section:
    """A table of a config file; typed getters record which keys were read."""

    def __init__(self, file: builtins.str, prefix: builtins.str, data: dict[builtins.str, Any]) -> None:
        self.file = file
        self.prefix = prefix
        self.data = data
        self._read: set[builtins.str] = set()

    def key(self, name: builtins.str) -> builtins.str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: builtins.str, value: Any, problem: builtins.str) -> ConfigError:
        return ConfigError(self.file, self.key(name), value, problem)

    def has(self, name: builtins.str) -> builtins.bool:
        return name in self.data

    def _get(self, name: builtins.str, default: Any) -> Any:
        self._read.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise self.error(name, None, "required key is missing")
        return default

    def section(self, name: builtins.str, required: builtins.bool = False) -> Section:
        self._read.add(name)
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise self.error(name, None, "required table is missing")
            value = {}
        if not isinstance(value, dict):
            raise self.error(name, value, "must be a table")
        return Section(self.file, self.key(name), value)

    def sections(self, name: builtins.str) -> list[Section]:
        """An array of tables (``[[name]]``)."""
        self._read.add(name)
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(name, value, "must be an array of tables ([[...]])")
        return [Section(self.file, f"{self.key(name)}[{i}]", v) for i, v in enumerate(value)]

    def str(self, name: builtins.str, default: Any = _MISSING, choices: Iterable[builtins.str] | None = None) -> builtins.str:
        value = self._get(name, default)
        if not isinstance(value, str):
            raise self.error(name, value, "must be a string")
        if choices is not None:
            allowed = list(choices)
            if value not in allowed:
                raise self.error(name, value, f"must be one of {', '.join(allowed)}")
        return value

    def int(
        self, name: builtins.str, default: Any = _MISSING, min: builtins.int | None = None, max: builtins.int | None = None
    ) -> builtins.int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, value, "must be an integer")
        self._check_range(name, value, min, max)
        return value

    def float(
        self,
        name: builtins.str,
        default: Any = _MISSING,
        min: builtins.float | None = None,
        max: builtins.float | None = None,
    ) -> builtins.float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, value, "must be a number")
        if not math.isfinite(value) and value is not default:  # TOML has nan and inf
            raise self.error(name, value, "must be a finite number")
        self._check_range(name, value, min, max)
        return float(value)

    def bool(self, name: builtins.str, default: Any = _MISSING) -> builtins.bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, value, "must be true or false")
        return value

    def str_list(self, name: builtins.str, default: Any = _MISSING) -> tuple[builtins.str, ...]:
        value = self._get(name, default)
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise self.error(name, value, "must be a list of strings")
        return tuple(value)

    def path(self, name: builtins.str, default: Any = _MISSING) -> Path:
        """A path; relative paths are taken relative to the config file's folder."""
        value = self.str(name, default)
        p = Path(value)
        return p if p.is_absolute() else Path(self.file).parent / p

    def _check_range(self, name: builtins.str, value: builtins.float, lo: builtins.float | None, hi: builtins.float | None) -> None:
        if lo is not None and value < lo:
            raise self.error(name, value, f"must be >= {lo}")
        if hi is not None and value > hi:
            raise self.error(name, value, f"must be <= {hi}")

    def reject_unknown(self, allowed: Sequence[builtins.str] | None = None) -> None:
        """Raise for keys nobody read (call after building the frozen object)."""
        known = set(allowed) if allowed is not None else self._read
        for name in self.data:
            if name not in known:
                raise self.error(name, self.data[name], "unknown key (misspelt?)")
