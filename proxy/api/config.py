"""The ``api`` and ``webhooks`` config sections, and ``sendguard api token`` that makes a token.

A token is shown once, when it is made; the config keeps only its SHA-256. A token is 32
random bytes, so a plain hash is enough (nothing to guess, unlike a password) and it costs
nothing per request, where scrypt would cost every call tens of milliseconds.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from proxy.schema import Duration, HostPort, Rate, Size, doc

__all__ = (
    "SCOPES",
    "WEBHOOK_EVENTS",
    "ApiConfig",
    "ApiToken",
    "WebhookEndpoint",
    "WebhooksConfig",
    "add_api_parser",
    "hash_token",
    "new_token",
    "run_api_command",
)

SCOPES: tuple[str, ...] = ("read", "write")
#: What a webhook can be told; ``complaint`` is an opt-out or suppression made by a complaint.
WEBHOOK_EVENTS: tuple[str, ...] = ("opted_out", "suppressed", "complaint", "paused")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
TOKEN_PREFIX = "sgapi_"  # noqa: S105 - a prefix that makes a leaked token easy to find, not a secret


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> tuple[str, str]:
    """A new token and its hash for the config."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, hash_token(token)


@dataclass(frozen=True)
class ApiToken:
    name: str = doc("who holds it (crm, signup-form); named in the audit log and the rate-limit key")
    hash: str = doc("sha256:<hex> of the token; make one with: sendguard api token NAME")
    scopes: tuple[Literal["read", "write"], ...] = doc(
        "read: status and history; write: also record events and import", default=("read",)
    )

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"token name {self.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if not _HASH.match(self.hash):
            raise ValueError("hash must be sha256: and 64 hex digits (sendguard api token NAME prints one)")
        if not self.scopes:
            raise ValueError("a token needs at least one scope (read, write)")


@dataclass(frozen=True)
class ApiConfig:
    address: HostPort | None = doc(
        "HOST:PORT of the consent API (not the metrics address); null disables it", default=None
    )
    tokens: tuple[ApiToken, ...] = doc("bearer tokens, stored hashed", default=())
    rate: Rate = doc("requests per token (shared through stores.state when that is redis)", default=Rate(600, 60))
    max_body: Size = doc("largest JSON request body", default=Size(64 * 1024))
    max_import: Size = doc("largest bulk import body (JSON lines or CSV)", default=Size(20 * 1024 * 1024))
    idempotency_ttl: Duration = doc(
        "how long an Idempotency-Key's first answer is kept and replayed", default=Duration(86400)
    )

    def __post_init__(self) -> None:
        names = [token.name for token in self.tokens]
        if len(set(names)) != len(names):
            raise ValueError("token names must be unique")
        if self.address is not None and not self.tokens:
            raise ValueError("the API needs at least one token (sendguard api token NAME)")
        if self.rate.count < 1 or self.rate.period <= 0:
            raise ValueError("rate must allow at least one request")
        if self.idempotency_ttl <= 0:
            raise ValueError("idempotency_ttl must be positive")


@dataclass(frozen=True)
class WebhookEndpoint:
    url: str = doc("where events are POSTed (https://; http:// only to loopback)")
    secret: str = doc("HMAC-SHA256 key, at least 16 characters; write ${SENDGUARD_WEBHOOK_SECRET}", repr=False)
    events: tuple[Literal["opted_out", "suppressed", "complaint", "paused"], ...] = doc(
        "which events this endpoint receives",
        default=WEBHOOK_EVENTS,
    )

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"url {self.url!r} must be an http(s) URL")
        if parts.scheme == "http" and not loopback:
            raise ValueError(f"url {self.url!r}: use https:// (opt-outs are personal data in transit)")
        if len(self.secret) < 16:
            raise ValueError("secret must be at least 16 characters")
        if not self.events:
            raise ValueError("events must name at least one event")


@dataclass(frozen=True)
class WebhooksConfig:
    endpoints: tuple[WebhookEndpoint, ...] = doc("where events go", default=())
    retry_min: Duration = doc("first retry after this long, then doubling", default=Duration(10))
    retry_max: Duration = doc("longest wait between two attempts", default=Duration(3600))
    max_age: Duration = doc("give up on a delivery this old (counted as failed)", default=Duration(3 * 86400))
    timeout: Duration = doc("time limit of one delivery attempt", default=Duration(10))
    interval: Duration = doc("how often the outbox is looked at for deliveries due", default=Duration(2))

    def __post_init__(self) -> None:
        for name in ("retry_min", "retry_max", "max_age", "timeout", "interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.retry_max < self.retry_min:
            raise ValueError("retry_max must not be shorter than retry_min")


# ---- sendguard api token ------------------------------------------------------------------------


def add_api_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    api = commands.add_parser("api", help="the consent API")
    api_commands = api.add_subparsers(dest="api_command", required=True, metavar="SUBCOMMAND")
    token = api_commands.add_parser("token", help="make a bearer token; print it once and its config entry")
    token.add_argument("name", help="who holds it (crm, signup-form)")
    token.add_argument("--scope", action="append", choices=SCOPES, help="read or write (repeatable; default read)")


def run_api_command(args: argparse.Namespace) -> int:
    if not _NAME.match(args.name):
        print(f"token name {args.name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        return 2
    token, digest = new_token()
    scopes = ", ".join(dict.fromkeys(args.scope or ["read"]))
    print(f"token (shown once; give it to {args.name}): {token}")
    print("config entry (api.tokens):")
    print(f"  - {{name: {args.name}, hash: '{digest}', scopes: [{scopes}]}}")
    return 0
