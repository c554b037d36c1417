"""The config's JSON Schema and reference are generated from the schema, committed, and
cannot drift: the committed files equal what the code makes, and every shipped config
validates against the JSON Schema (issue 12)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from proxy.cli.main import main
from proxy.config.reference import config_reference, config_schema

# Made once for the module: every parametrized case validates against the same schema.
validator = functools.cache(lambda: jsonschema.Draft202012Validator(config_schema()))

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "config" / "sendguard.schema.json"
REFERENCE = ROOT / "docs" / "configuration.md"
SHIPPED = sorted(
    [
        *(ROOT / "config").glob("*.yaml"),
        *(ROOT / "config" / "examples").glob("*.yaml"),
        ROOT / "deploy" / "compose" / "sendguard.yaml",
    ]
)


def test_the_committed_schema_and_reference_are_what_the_code_makes(capsys: pytest.CaptureFixture[str]) -> None:
    regenerate = (
        "sendguard config schema > config/sendguard.schema.json; sendguard config reference > docs/configuration.md"
    )
    assert json.loads(SCHEMA.read_text()) == config_schema(), f"stale: {regenerate}"
    assert REFERENCE.read_text() == config_reference(), f"stale: {regenerate}"
    assert main(["config", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == config_schema()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates_against_the_schema(path: Path) -> None:
    validator().validate(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"listeners": [{"name": "x", "address": "127.0.0.1:25", "trusted_network": []}]}, "trusted_network"),
        ({"listeners": [{"name": "x", "address": "127.0.0.1:25"}], "timeouts": {"idle": "5 parsecs"}}, "parsecs"),
        ({"listeners": [{"name": "x", "address": "127.0.0.1:25"}], "policies": [{"name": "rate_limit"}]}, "limits"),
        ({"listeners": [{"name": "x", "address": "127.0.0.1:25"}], "policies": [{"name": "nope"}]}, "nope"),
    ],
)
def test_the_schema_refuses_what_the_loader_refuses(change: dict[str, object], complaint: str) -> None:
    errors = list(validator().iter_errors(change))
    assert errors and any(complaint in str(error) for error in errors), errors


def test_the_reference_documents_every_key_of_the_default_config() -> None:
    text = REFERENCE.read_text()
    for key in ("`listeners`", "`max_message_size`", "`trusted_networks`", "### `policies[]: rate_limit`"):
        assert key in text
