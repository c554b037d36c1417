"""The ``unsubscribe`` config section, its checks, and ``sendguard unsubscribe keygen`` for its keys.

Re-exported by ``proxy.unsubscribe``, where the service that uses it lives.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from proxy.schema import Duration, HostPort, IPNetwork, Rate, Size, doc
from proxy.stores.consent import ANY, normalize_topic
from proxy.unsubscribe.tokens import decode_secret, new_secret

__all__ = (
    "LANGUAGES",
    "MailtoConfig",
    "TopicConfig",
    "UnsubscribeConfig",
    "UnsubscribeKeyConfig",
    "UnsubscribeRateLimits",
    "add_unsubscribe_parser",
    "keygen",
    "run_unsubscribe_command",
)

LANGUAGES: tuple[str, ...] = ("nl", "en")
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class UnsubscribeKeyConfig:
    id: str = doc("short name of the key, e.g. 2026a (shown in evidence; not secret)")
    secret: str = doc(
        "at least 32 random bytes, base64; write ${SENDGUARD_UNSUBSCRIBE_KEY_2026A} and make one with "
        "sendguard unsubscribe keygen",
        repr=False,
    )

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.id):
            raise ValueError(f"key id {self.id!r}: use 1-32 letters, digits, '.', '_' or '-'")
        decode_secret(self.secret)


@dataclass(frozen=True)
class TopicConfig:
    id: str = doc("the topic as X-Sendguard-Topic names it (newsletter, offers ...)")
    nl: str = doc("its name on the Dutch page (default: the id)", default="")
    en: str = doc("its name on the English page (default: the id)", default="")

    def __post_init__(self) -> None:
        topic = normalize_topic(self.id)
        if topic == ANY:
            raise ValueError("a topic id cannot be * (it means every topic)")
        object.__setattr__(self, "id", topic)


@dataclass(frozen=True)
class UnsubscribeRateLimits:
    per_ip: Rate = doc("page views and form posts from one client IP", default=Rate(60, 60))
    per_token: Rate = doc("requests that name one token (one-click POSTs included)", default=Rate(10, 60))
    invalid_per_ip: Rate = doc(
        "requests with an invalid token from one client IP before that IP gets 429", default=Rate(20, 600)
    )


@dataclass(frozen=True)
class MailtoConfig:
    address: str = doc("the unsubscribe address in the mailto: URI, e.g. unsubscribe@news.example.com")
    listen: HostPort | None = doc(
        "HOST:PORT of sendguard's SMTP listener that takes mail to that address (route the address's mail "
        "there); null: the mailto: URI is added but sendguard does not listen for it",
        default=None,
    )
    max_message_size: Size = doc("largest unsubscribe mail accepted", default=Size(64 * 1024))

    def __post_init__(self) -> None:
        local, at, domain = self.address.strip().rpartition("@")
        if not at or not local or "." not in domain or any(c in self.address for c in " <>\"'?&"):
            raise ValueError(f"mailto.address {self.address!r} is not a plain address (unsubscribe@example.com)")
        object.__setattr__(self, "address", f"{local}@{domain.lower()}")


@dataclass(frozen=True)
class UnsubscribeConfig:
    enabled: bool = doc("add List-Unsubscribe links and serve the unsubscribe pages", default=False)
    base_url: str | None = doc(
        "public https:// URL the links point at (the pages are served under its path), e.g. "
        "https://unsubscribe.example.com",
        default=None,
    )
    listen: HostPort = doc(
        "HOST:PORT of the public unsubscribe pages (not the metrics address: these face the Internet); "
        "put a TLS-terminating reverse proxy in front, or give tls_cert and tls_key",
        default=HostPort("127.0.0.1", 8025),
    )
    tls_cert: str | None = doc("PEM certificate chain, to serve HTTPS directly", default=None)
    tls_key: str | None = doc("PEM private key for tls_cert", default=None)
    trusted_proxies: tuple[IPNetwork, ...] = doc(
        "reverse proxies whose X-Forwarded-For names the client (for rate limits and evidence)", default=()
    )
    keys: tuple[UnsubscribeKeyConfig, ...] = doc(
        "token keys: the first issues new links, all verify; remove a key to kill its links", default=()
    )
    token_ttl: Duration = doc(
        "how long a link shows the recipient's page; opt-outs are honoured after it, too", default=Duration(400 * 86400)
    )
    mailto: MailtoConfig | None = doc("the mailto: unsubscribe address (optional)", default=None)
    languages: tuple[Literal["nl", "en"], ...] = doc(
        "languages of the pages; the first is the default", default=("nl", "en")
    )
    footer_language: Literal["nl", "en", "both"] | None = doc(
        "language of an added unsubscribe footer (default: the first of languages)", default=None
    )
    company: str = doc("who keeps the data (the controller), shown on every page", default="")
    contact: str = doc("where to ask about the data (e-mail address or URL), shown on the pages", default="")
    privacy_url: str | None = doc("link to the privacy statement", default=None)
    topics: tuple[TopicConfig, ...] = doc("topics a recipient can choose on the page, with their names", default=())
    rate_limits: UnsubscribeRateLimits = doc("per-client limits (429 beyond)", default_factory=UnsubscribeRateLimits)

    def __post_init__(self) -> None:
        if not self.languages:
            raise ValueError("languages needs at least one of nl, en")
        if len(set(self.languages)) != len(self.languages):
            raise ValueError("languages lists a language twice")
        if self.token_ttl < 86400:
            raise ValueError("token_ttl must be at least 1d (links live in mailboxes for months)")
        ids = [key.id for key in self.keys]
        if len(set(ids)) != len(ids):
            raise ValueError("two keys have the same id")
        topic_ids = [topic.id for topic in self.topics]
        if len(set(topic_ids)) != len(topic_ids):
            raise ValueError("a topic is listed twice")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.base_url is not None:
            object.__setattr__(self, "base_url", _check_base_url(self.base_url))
        if not self.enabled:
            return
        missing = [name for name in ("base_url", "company", "contact") if not getattr(self, name)]
        if not self.keys:
            missing.append("keys")
        if missing:
            raise ValueError(
                f"unsubscribe is enabled but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set"
            )

    @property
    def base_path(self) -> str:
        """The path the pages live under ("" for a base_url without a path)."""
        return urllib.parse.urlsplit(self.base_url or "").path.rstrip("/")

    @property
    def footer_languages(self) -> tuple[str, ...]:
        if self.footer_language == "both":
            return tuple(self.languages) if len(self.languages) > 1 else LANGUAGES
        return (self.footer_language or self.languages[0],)


def _check_base_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme == "http" and (parts.hostname or "").lower() in _LOOPBACK_NAMES:
        pass  # a local trial; mailbox providers only follow https
    elif parts.scheme != "https":
        raise ValueError(f"base_url {url!r} must start with https:// (RFC 8058 section 3.1)")
    if not parts.hostname or parts.query or parts.fragment or parts.username:
        raise ValueError(f"base_url {url!r} must be https://host[/path], without query, fragment or user")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def keygen(key_id: str | None = None) -> str:
    """A fresh key entry for ``unsubscribe.keys`` (YAML), with how to rotate."""
    name = key_id or datetime.now(UTC).strftime("k%Y%m%d")
    if not _KEY_ID.match(name):
        raise ValueError(f"key id {name!r}: use 1-32 letters, digits, '.', '_' or '-'")
    variable = "SENDGUARD_UNSUBSCRIBE_KEY_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()
    return (
        f"# A new unsubscribe token key. Keep the secret out of the config file:\n"
        f"#   export {variable}='{new_secret()}'\n"
        f"# and put the entry FIRST under unsubscribe.keys (the first key issues new links). Keep the\n"
        f"# old entries below it for as long as their links must work (token_ttl); then remove them.\n"
        f"- id: {name}\n"
        f"  secret: ${{{variable}}}\n"
    )


def add_unsubscribe_parser(subparsers: Any) -> Any:
    """``sendguard unsubscribe keygen [--id ID]`` in the ``sendguard`` command set."""
    parser = subparsers.add_parser("unsubscribe", help="one-click unsubscribe: token keys")
    commands = parser.add_subparsers(dest="unsubscribe_command", required=True, metavar="SUBCOMMAND")
    generate = commands.add_parser(
        "keygen",
        help="print a new token key entry for unsubscribe.keys",
        description="Print a fresh unsubscribe token key: 32 random bytes, base64, and the config entry.",
    )
    generate.add_argument("--id", dest="key_id", help="key id (default: k + today's date, e.g. k20261129)")
    return parser


def run_unsubscribe_command(args: Any, out: Any = None) -> int:
    """Run ``sendguard unsubscribe ...``; 0 done, 2 bad input."""
    import sys

    stream = out or sys.stdout
    if args.unsubscribe_command == "keygen":
        try:
            print(keygen(args.key_id), end="", file=stream)
        except ValueError as exc:
            print(f"sendguard: {exc}", file=sys.stderr)
            return 2
        return 0
    raise AssertionError(f"unknown unsubscribe command {args.unsubscribe_command!r}")
