"""Reading an admin's word-list file (the unsubscribe and commercial-mail vocabularies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ("load_yaml", "read_yaml_file")

#: libyaml's loader where PyYAML was built with it: the shipped word lists load in a tenth
#: of the time (each worker process and each reload reads them).
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` with libyaml's loader when there is one (the same safe subset)."""
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a SafeLoader


def read_yaml_file(path: str | Path) -> Any:
    """The parsed YAML of a words file; ValueError says what is wrong with it, in one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the words file {path}: {exc}") from None
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"words file {path} is not valid YAML: {exc}") from None
