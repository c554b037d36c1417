"""Reading an admin's word-list file (the unsubscribe and commercial-mail vocabularies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ("read_yaml_file",)


def read_yaml_file(path: str | Path) -> Any:
    """The parsed YAML of a words file; ValueError says what is wrong with it, in one line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the words file {path}: {exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"words file {path} is not valid YAML: {exc}") from None
