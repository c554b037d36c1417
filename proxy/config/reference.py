"""The config's JSON Schema (for editors) and its reference (Markdown), both generated from
the schema itself: the dataclasses in ``proxy.config.settings`` and the policies' ``Options``,
their types and their ``doc()`` texts. Nothing is written by hand, so the docs cannot drift
from the code (a test compares the committed files with what this module makes).

``sendguard config schema`` prints the JSON Schema; ``sendguard config reference`` the
Markdown. The committed copies are ``config/sendguard.schema.json`` and
``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import types
import typing
from typing import Any, Literal, Union

from policies import REGISTRY
from proxy.config.settings import PolicyEntry, Settings, _PolicyCommon
from proxy.schema import _DURATION_UNITS, _SIZE_UNITS, Duration, HostPort, Rate, Size, Workers

__all__ = ("config_reference", "config_schema")

# A scalar may be ${ENV_NAME} (or ${ENV_NAME:-default}) in any field: expanded on load.
_ENV = {"type": "string", "pattern": r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}$"}


def _units(units: typing.Iterable[str]) -> str:
    """A number and one of the loader's units, any case (JSON Schema's regexes have no flags)."""
    spelled = sorted((u for u in units if u), key=len, reverse=True)
    either = "|".join("".join(f"[{c.lower()}{c.upper()}]" for c in unit) for unit in spelled)
    return rf"^\s*\d+(\.\d+)?\s*({either})\s*$"


_DURATION = _units(_DURATION_UNITS)
_SIZE = _units(_SIZE_UNITS)
_RATE = r"^\s*\d+\s*/\s*(\d+(\.\d+)?)?\s*[a-zA-Z]+\s*$"


def _fields(cls: type) -> list[tuple[str, dataclasses.Field[Any], Any]]:
    """(YAML key, field, type) of the keys a config file may write."""
    hints = typing.get_type_hints(cls)
    return [
        (f.metadata.get("key", f.name), f, hints[f.name])
        for f in dataclasses.fields(cls)
        if f.init and not f.metadata.get("internal")
    ]


def _default(field: dataclasses.Field[Any]) -> Any:
    """The field's default as JSON, or dataclasses.MISSING when it has none (or none simple)."""
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
        if dataclasses.is_dataclass(value):
            return dataclasses.MISSING  # a section: its own keys say their defaults
    else:
        return dataclasses.MISSING
    if isinstance(value, HostPort):
        return str(value)
    if isinstance(value, Rate):
        return None
    if isinstance(value, tuple | list):
        if any(dataclasses.is_dataclass(v) for v in value):
            return dataclasses.MISSING
        value = [str(v) if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network) else v for v in value]
    if isinstance(value, Duration):
        return _seconds_text(float(value))
    if isinstance(value, Size):
        return int(value)
    try:
        json.dumps(value)
    except TypeError:
        return dataclasses.MISSING
    return value


def _seconds_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms" if seconds < 1 else f"{seconds:g}s"


def _type(tp: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        if set(non_null) == {ipaddress.IPv4Network, ipaddress.IPv6Network}:
            schema: dict[str, Any] = {"type": "string", "description": "an IP address or network, e.g. 10.0.0.0/8"}
        else:
            (only,) = non_null
            schema = _type(only)
        return {"anyOf": [schema, {"type": "null"}]} if len(non_null) < len(args) else schema
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": _type(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type(args[1])}
    if tp is PolicyEntry:
        return _policy_entry()
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp not in (HostPort, Rate):
        return _object(tp)
    scalar: dict[str, Any]
    if tp is str:
        return {"type": "string"}
    if tp is bool:
        scalar = {"type": "boolean"}
    elif tp is int:
        scalar = {"type": "integer"}
    elif tp is float:
        scalar = {"type": "number"}
    elif tp is Duration:
        scalar = {"anyOf": [{"type": "string", "pattern": _DURATION}, {"type": "number", "minimum": 0}]}
        scalar["description"] = "a duration: 500ms, 10s, 5m, 2h, 1d (a bare number is seconds, with a warning)"
    elif tp is Size:
        scalar = {"anyOf": [{"type": "string", "pattern": _SIZE}, {"type": "integer", "minimum": 0}]}
        scalar["description"] = "a size: 512KB, 25MB, 1GB (binary multiples; a bare number is bytes, with a warning)"
    elif tp is Workers:
        scalar = {"anyOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}
        scalar["description"] = "a number of processes, or auto: one per core"
    elif tp is Rate:
        return {"type": "string", "pattern": _RATE, "description": "a rate: 30/min, 10000/day, 5/10m"}
    elif tp is HostPort:
        return {"type": "string", "description": "HOST:PORT, e.g. 127.0.0.1:2525 or [::1]:25"}
    else:
        raise TypeError(f"no JSON Schema for {tp!r}")
    return {"anyOf": [scalar, _ENV]}


def _object(cls: type, *, extra: dict[str, Any] | None = None, skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    required: list[str] = []
    for key, field, tp in _fields(cls):
        if key in skip:
            continue
        schema = _type(tp)
        text = field.metadata.get("doc")
        if text:
            schema = {**schema, "description": text}
        default = _default(field)
        if default is not dataclasses.MISSING:
            schema["default"] = default
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            required.append(key)
        properties[key] = schema
    if extra:
        properties.update(extra)
    result: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        result["description"] = cls.__doc__.strip().splitlines()[0]
    if required:
        result["required"] = required
    return result


def _policy_entry() -> dict[str, Any]:
    """One of the registered policies: its name, the common keys and its own options, flat."""
    variants = []
    for name in sorted(REGISTRY):
        policy = REGISTRY[name]
        schema = _object(policy.Options)
        common = _object(_PolicyCommon, skip=frozenset({"name"}))
        schema["properties"] = {
            "name": {"const": name, "description": policy.description or name},
            **common["properties"],
            **schema["properties"],
        }
        schema["required"] = ["name", *schema.get("required", [])]
        schema.pop("description", None)
        variants.append({"if": {"properties": {"name": {"const": name}}}, "then": schema})
    return {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"enum": sorted(REGISTRY), "description": "a registered policy"}},
        "allOf": variants,
    }


def config_schema() -> dict[str, Any]:
    schema = _object(Settings)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://sendguard.invalid/sendguard.schema.json",
        "title": "sendguard configuration",
        "description": "Generated from proxy/config/settings.py by `sendguard config schema`; do not edit.",
        **{k: v for k, v in schema.items() if k != "description"},
    }


# ---- the Markdown reference ------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        if set(non_null) == {ipaddress.IPv4Network, ipaddress.IPv6Network}:
            return "network"
        return _type_name(non_null[0]) + (" or null" if len(non_null) < len(args) else "")
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"map of {_type_name(args[1])}"
    if tp is PolicyEntry:
        return "policy"
    if dataclasses.is_dataclass(tp) and isinstance(tp, type) and tp not in (HostPort, Rate):
        return "section"
    if tp is Workers:
        return "number or `auto`"
    return {str: "text", bool: "true/false", int: "number", float: "number"}.get(tp, getattr(tp, "__name__", str(tp)))


def _section(out: list[str], title: str, cls: type, skip: frozenset[str] = frozenset()) -> list[tuple[str, type]]:
    nested: list[tuple[str, type]] = []
    out += [f"### `{title}`", ""]
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out += [cls.__doc__.strip().splitlines()[0], ""]
    out += ["| key | type | default | what |", "|---|---|---|---|"]
    for key, field, tp in _fields(cls):
        if key in skip:
            continue
        default = _default(field)
        if default is dataclasses.MISSING:
            shown = (
                "required"
                if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
                else ""
            )
        else:
            shown = f"`{json.dumps(default)}`"
        text = field.metadata.get("doc", "").replace("|", "\\|")
        out.append(f"| `{key}` | {_type_name(tp)} | {shown} | {text} |")
        inner = tp
        while typing.get_origin(inner) in (Union, types.UnionType, list, tuple):
            inner = next(a for a in typing.get_args(inner) if a is not type(None) and a is not Ellipsis)
        if (
            dataclasses.is_dataclass(inner)
            and isinstance(inner, type)
            and inner not in (HostPort, Rate, PolicyEntry)  # policies: their own chapter
        ):
            suffix = "[]" if typing.get_origin(tp) in (list, tuple) else ""
            nested.append((f"{title}.{key}{suffix}" if title != "(top)" else f"{key}{suffix}", inner))
    out.append("")
    return nested


def config_reference() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the schema (`proxy/config/settings.py` and each policy's `Options`) by",
        "`sendguard config reference`; do not edit: a test fails when it differs from the code.",
        "Durations are written `500ms`, `10s`, `5m`, `2h`, `1d`; sizes `512KB`, `25MB`; rates",
        "`30/min`, `5/10m`; any value may be `${ENV_NAME}` or `${ENV_NAME:-default}`. For editors,",
        "`config/sendguard.schema.json` is the same schema as JSON Schema",
        "(`# yaml-language-server: $schema=sendguard.schema.json` at the top of a config file).",
        "",
        "## Sections",
        "",
    ]
    queue: list[tuple[str, type]] = [("(top)", Settings)]
    while queue:
        title, cls = queue.pop(0)
        queue.extend(_section(out, title, cls))
    out += ["## Policies", "", "Every entry of `policies:` has the common keys and its policy's own.", ""]
    _section(out, "policies[] (every policy)", _PolicyCommon)
    for name in sorted(REGISTRY):
        policy = REGISTRY[name]
        more = _section(out, f"policies[]: {name}", policy.Options)
        for title, cls in more:
            _section(out, title, cls)
    return "\n".join(out).rstrip() + "\n"
