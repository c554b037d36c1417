"""Typed YAML: convert a YAML document into frozen dataclasses, reporting every error at once.

The converter works on PyYAML's node tree (``yaml.compose``), not on plain Python objects,
so every error carries the file, line and dotted key path of the value at fault. It knows:

* dataclasses (unknown keys rejected, with a "did you mean" hint; missing keys reported);
* ``str``, ``int``, ``float``, ``bool``, ``Literal[...]``, ``X | None``, ``list[X]``,
  ``tuple[X, ...]``, ``dict[str, X]``;
* human units: ``Duration`` (``500ms``, ``10s``, ``5m``, ``2h``, ``1d``), ``Size``
  (``512KB``, ``25MB``, ``1GB``; binary multiples), ``Rate`` (``30/min``, ``10000/day``,
  ``5/10m``), ``HostPort`` (``127.0.0.1:2525``, ``[::1]:25``) and IP networks;
* ``${NAME}`` and ``${NAME:-default}`` expansion in every scalar, for secrets.

Duplicate keys are errors (PyYAML silently keeps the last one, which hides typos).
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = (
    "INVALID",
    "ConfigError",
    "ConfigIssue",
    "Converter",
    "Duration",
    "HostPort",
    "IPNetwork",
    "address_in",
    "Rate",
    "Size",
    "Workers",
    "cores",
    "doc",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "parse_workers",
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '(top)'}: {self.message}"


class ConfigError(Exception):
    """One or more problems in a configuration file; ``issues`` lists all of them."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def doc(text: str, *, key: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field with a one-line description; ``key`` spells it differently in YAML."""
    metadata: dict[str, str] = {"doc": text}
    if key:
        metadata["key"] = key
    return dataclasses.field(metadata=metadata, **kwargs)


# ---- units --------------------------------------------------------------------------------


class Duration(float):
    """Seconds, written as ``500ms``, ``10s``, ``5m``, ``2h``, ``1d``, ``2w``, ``2y`` or a plain number."""

    def __repr__(self) -> str:
        return f"Duration({float(self)}s)"


class Size(int):
    """Bytes, written as ``1024``, ``512KB``, ``25MB``, ``1GB`` (K/M/G are binary)."""

    def __repr__(self) -> str:
        return f"Size({int(self)})"


class Workers(int):
    """A number of worker processes, written as a whole number or ``auto`` (one per core)."""

    def __repr__(self) -> str:
        return f"Workers({int(self)})"


#: More workers than this is a typo, not a machine: each one holds its own pools and caches.
MAX_WORKERS = 256


def cores() -> int:
    """The cores this process may run on (taskset, a cgroup cpuset), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_workers(text: str) -> Workers:
    text = text.strip()
    if text.lower() == "auto":
        return Workers(cores())
    try:
        count = int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"expected a whole number of worker processes or auto, not {text!r}") from None
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"workers must be from 1 to {MAX_WORKERS} (or auto), not {count}")
    return Workers(count)


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` events per ``period`` seconds, written ``30/min``, ``10000/day``, ``5/10m``."""

    count: int
    period: float

    def __str__(self) -> str:
        return f"{self.count}/{_format_seconds(self.period)}"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_in(ip: str, networks: typing.Iterable[IPNetwork]) -> bool:
    """Whether an address (IPv4-mapped IPv6 counted as its IPv4) lies in any of the networks;
    False for anything that is not an address."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


_DURATION_UNITS = {
    "": 1, "ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600,
    "d": 86400, "day": 86400, "w": 604800, "week": 604800, "y": 365 * 86400, "year": 365 * 86400,
}  # fmt: skip
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.I)
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.I)
_RATE_PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
    "w": 604800,
    "week": 604800,
}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$", re.I)


def _format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return unit if count == 1 else f"{count}{unit}"
    return f"{seconds:g}s"


def parse_duration(text: str) -> Duration:
    match = _DURATION_RE.match(text)
    if not match or match.group(2).lower() not in _DURATION_UNITS:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 10s, 5m, 2h, 1d)")
    return Duration(float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()])


def parse_size(text: str) -> Size:
    match = _SIZE_RE.match(text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (use e.g. 512KB, 25MB, 1GB)")
    return Size(int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]))


def _is_bare_number(text: str) -> bool:
    """``24`` but not ``0`` (zero is zero in every unit) nor ``24h``."""
    match = _DURATION_RE.match(text)
    return bool(match) and not match.group(2) and float(match.group(1)) != 0  # type: ignore[union-attr]


def _bare_note(text: str, tp: Any) -> str:
    number = text.strip()
    if tp is Duration:
        # rate_window: 24 meant 24 hours to whoever wrote it, and is read as 24 seconds.
        return f"{number} without a unit is read as {number} seconds; write the unit: {number}s, {number}m or {number}h"
    return f"{number} without a unit is read as {number} bytes; write the unit: {number}B, {number}KB or {number}MB"


def parse_rate(text: str) -> Rate:
    match = _RATE_RE.match(text)
    unit = match.group(3).lower() if match else ""
    if not match or unit not in _RATE_PERIODS:
        raise ValueError(f"not a rate: {text!r} (use e.g. 30/min, 500/h, 10000/day, 5/10m)")
    multiplier = float(match.group(2)) if match.group(2) else 1.0
    period = multiplier * _RATE_PERIODS[unit]
    if period <= 0:
        raise ValueError(f"rate period must be positive: {text!r}")
    return Rate(int(match.group(1)), period)


def parse_hostport(text: str) -> HostPort:
    text = text.strip()
    match = re.match(r"^\[([0-9a-fA-F:.]+)\]:(\d+)$", text) or re.match(r"^([^:\s]+):(\d+)$", text)
    if not match:
        raise ValueError(f"not HOST:PORT: {text!r} (use e.g. 127.0.0.1:2525 or [::1]:2525)")
    port = int(match.group(2))
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return HostPort(match.group(1), port)


# ---- environment expansion -----------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str, environ: typing.Mapping[str, str]) -> str:
    """Replace ``${NAME}`` / ``${NAME:-default}``; an unset name without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} for a default)")

    return _ENV_RE.sub(substitute, text)


# ---- the converter -------------------------------------------------------------------------

INVALID: Any = object()
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}
_NULL_TAG = "tag:yaml.org,2002:null"

CustomHook = Callable[["Converter", yaml.Node, str], Any]


class Converter:
    """Converts YAML nodes to typed values, collecting issues instead of stopping at the first."""

    def __init__(self, filename: str, environ: typing.Mapping[str, str] | None = None) -> None:
        self.filename = filename
        self.environ = os.environ if environ is None else environ
        self.issues: list[ConfigIssue] = []
        #: Accepted but doubtful (a bare number for a duration or a size): said, not refused.
        self.warnings: list[ConfigIssue] = []
        self.lines: dict[str, int] = {}  # dotted path -> line, for cross-field checks
        #: Hooks for dataclass types that need custom handling (e.g. the policy list).
        self.hooks: dict[type, CustomHook] = {}

    def error(self, node: yaml.Node | None, path: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else self.lines.get(path)
        self.issues.append(ConfigIssue(self.filename, line, path, message))

    def error_at(self, path: str, message: str) -> None:
        """An error about a value already converted, located by its path."""
        line = self.lines.get(path)
        probe = path
        while line is None and "." in probe:  # fall back to the nearest located parent
            probe = probe.rsplit(".", 1)[0]
            line = self.lines.get(probe)
        self.issues.append(ConfigIssue(self.filename, line, path, message))

    # -- scalars

    def scalar_text(self, node: yaml.Node, path: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            kind = "a list" if isinstance(node, yaml.SequenceNode) else "a mapping"
            self.error(node, path, f"expected a single value, found {kind}")
            return None
        try:
            return expand_env(str(node.value), self.environ)
        except ValueError as exc:
            self.error(node, path, str(exc))
            return None

    @staticmethod
    def is_null(node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG

    def convert(self, node: yaml.Node, tp: Any, path: str) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)

        if origin in (Union, types.UnionType):
            non_null = [a for a in args if a is not type(None)]
            if self.is_null(node):
                if len(non_null) < len(args):
                    return None
                self.error(node, path, "a value is required here")
                return INVALID
            if len(non_null) == 1:
                return self.convert(node, non_null[0], path)
            if set(non_null) == {ipaddress.IPv4Network, ipaddress.IPv6Network}:
                return self._network(node, path)
            raise TypeError(f"unsupported union in schema: {tp}")
        if origin is Literal:
            text = self.scalar_text(node, path)
            if text is None:
                return INVALID
            if text not in args:
                hint = difflib.get_close_matches(text, [str(a) for a in args], n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else ""
                self.error(node, path, f"must be one of {', '.join(map(str, args))}, not {text!r}{extra}")
                return INVALID
            return text
        if origin in (list, tuple):
            return self._sequence(node, args[0], path, tuple if origin is tuple else list)
        if origin is dict:
            return self._mapping(node, args[1], path)
        if isinstance(tp, type) and tp in self.hooks:
            return self.hooks[tp](self, node, path)
        if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp not in _SCALAR_DATACLASSES:
            return self.dataclass(node, tp, path)
        if self.is_null(node):
            self.error(node, path, "a value is required here")
            return INVALID
        text = self.scalar_text(node, path)
        if text is None:
            return INVALID
        try:
            value = self._scalar(text, tp)
        except ValueError as exc:
            self.error(node, path, str(exc))
            return INVALID
        if tp in (Duration, Size) and _is_bare_number(text):
            self.warnings.append(ConfigIssue(self.filename, node.start_mark.line + 1, path, _bare_note(text, tp)))
        return value

    def _scalar(self, text: str, tp: Any) -> Any:
        if tp is str:
            return text
        if tp is bool:
            lowered = text.lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(f"expected true or false, not {text!r}")
        if tp is int:
            try:
                return int(text.replace("_", ""))
            except ValueError:
                raise ValueError(f"expected a whole number, not {text!r}") from None
        if tp is float:
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"expected a number, not {text!r}") from None
        if tp is Duration:
            return parse_duration(text)
        if tp is Size:
            return parse_size(text)
        if tp is Rate:
            return parse_rate(text)
        if tp is HostPort:
            return parse_hostport(text)
        if tp is Workers:
            return parse_workers(text)
        raise TypeError(f"unsupported type in schema: {tp!r}")

    def _network(self, node: yaml.Node, path: str) -> Any:
        text = self.scalar_text(node, path)
        if text is None:
            return INVALID
        try:
            return ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            self.error(node, path, f"not an IP address or network: {text!r} (use e.g. 10.0.0.0/8)")
            return INVALID

    def _sequence(self, node: yaml.Node, item_tp: Any, path: str, kind: type) -> Any:
        if self.is_null(node):
            return kind()
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, path, "expected a list")
            return INVALID
        items = [self.convert(child, item_tp, f"{path}[{i}]") for i, child in enumerate(node.value)]
        if any(item is INVALID for item in items):
            return INVALID
        return kind(items)

    def mapping_items(self, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        """(key, key node, value node) for a mapping node, reporting duplicate keys."""
        if self.is_null(node):
            return []
        if not isinstance(node, yaml.MappingNode):
            self.error(node, path, "expected a mapping of key: value")
            return None
        seen: set[str] = set()
        out: list[tuple[str, yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_node, path, "keys must be plain names")
                continue
            key = str(key_node.value)
            if key in seen:
                self.error(key_node, _join(path, key), "key appears twice")
                continue
            seen.add(key)
            out.append((key, key_node, value_node))
        return out

    def _mapping(self, node: yaml.Node, value_tp: Any, path: str) -> Any:
        items = self.mapping_items(node, path)
        if items is None:
            return INVALID
        result = {key: self.convert(value, value_tp, _join(path, key)) for key, _, value in items}
        if any(v is INVALID for v in result.values()):
            return INVALID
        return result

    def dataclass(self, node: yaml.Node, cls: type[T], path: str, *, skip: frozenset[str] = frozenset()) -> T:
        items = self.mapping_items(node, path)
        if items is None:
            return INVALID  # type: ignore[no-any-return]
        hints = typing.get_type_hints(cls)
        # A field may be spelt differently in YAML (``class`` is a Python keyword).
        fields = {f.metadata.get("key", f.name): f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        values: dict[str, Any] = {}
        present: set[str] = set()
        ok = True
        for key, key_node, value_node in items:
            if key in skip:
                continue
            present.add(key)
            field = fields.get(key)
            if field is None:
                hint = difflib.get_close_matches(key, list(fields), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(sorted(fields))}"
                self.error(key_node, _join(path, key), f"unknown key{extra}")
                ok = False
                continue
            value = self.convert(value_node, hints[field.name], _join(path, key))
            if value is INVALID:
                ok = False
            else:
                values[field.name] = value
        for name, field in fields.items():
            if name in present or name in skip:
                continue
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                self.error(node, _join(path, name), "required key is missing")
                ok = False
        if not ok:
            return INVALID  # type: ignore[no-any-return]
        try:
            return cls(**values)
        except (ValueError, TypeError) as exc:
            self.error(node, path, str(exc))
            return INVALID  # type: ignore[no-any-return]


_SCALAR_DATACLASSES = (HostPort, Rate)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def is_invalid(value: Any) -> bool:
    return value is INVALID


def compose(text: str, filename: str) -> yaml.Node | None:
    """Parse YAML text into a node tree; syntax errors become a ConfigError with a line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise ConfigError([ConfigIssue(filename, line, "", f"YAML syntax error: {exc.problem or exc}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigIssue(filename, None, "", f"YAML error: {exc}")]) from exc
