"""Fixtures of the unsubscribe tests (defined in harness.py, shared with tests/browser)."""

from tests.unsubscribe.harness import http, running_factory  # noqa: F401 - fixtures
