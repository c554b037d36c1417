"""Fixtures of the API tests (defined in harness.py)."""

from tests.api.harness import api_factory, receiver  # noqa: F401 - fixtures
