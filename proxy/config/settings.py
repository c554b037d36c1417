"""The configuration schema of sendguard and its loader.

One YAML file, one schema: every section is a frozen dataclass below, unknown keys are
errors, and ``load_config`` reports every problem at once with file, line and key path.
Cross-field rules (the timeout budget, TLS files given together, no open relay, unique
names) live together in ``_validate``.

Why one module of about 680 lines: it is the whole schema, read as a reference. The sections
are small dataclasses that an operator looks up side by side, the loader walks all of them,
and ``_validate``'s rules cut across every section; spread over files, the schema would be
harder to read with nothing gained. Sections that belong to one room live in that room
(``stores.consent`` in proxy/stores/consent.py, ``unsubscribe`` in proxy/unsubscribe/config.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from policies import REGISTRY
from policies.base import MESSAGE_CLASSES, Policy
from proxy.api.config import ApiConfig, WebhooksConfig
from proxy.reputation.backoff import BackoffConfig
from proxy.reputation.bounces import BounceConfig
from proxy.reputation.complaints import ComplaintConfig
from proxy.reputation.dkim import DKIMConfig, dkim_config_problems
from proxy.reputation.resolver import DNSConfig
from proxy.schema import (
    INVALID,
    ConfigError,
    ConfigIssue,
    Converter,
    Duration,
    HostPort,
    IPNetwork,
    Size,
    Workers,
    compose,
    doc,
    is_invalid,
    parse_hostport,
    parse_workers,
)
from proxy.stores.consent import ConsentStoreConfig
from proxy.stores.limits import LimitStoreConfig
from proxy.unsubscribe import UnsubscribeConfig

__all__ = (
    "ClassRule",
    "ConfigError",
    "ListenerConfig",
    "PolicyEntry",
    "Settings",
    "SpoolConfig",
    "UpstreamConfig",
    "load_config",
    "parse_upstream_address",
)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_UNIQUE_LOCAL = ipaddress.IPv6Network("fc00::/7")  # RFC 4193: private, however wide


def _too_wide(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    """A prefix that covers a large part of the Internet (wider than /8, or /32 for IPv6
    outside the private fc00::/7)."""
    too_wide = network.prefixlen < (8 if network.version == 4 else 32)
    return too_wide and not (isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_UNIQUE_LOCAL))


@dataclass(frozen=True)
class ListenerTLS:
    mode: Literal["none", "starttls", "implicit"] = doc(
        "none, starttls (offered on the port) or implicit (port 465 style)", default="none"
    )
    cert: str | None = doc("PEM certificate chain file", default=None)
    key: str | None = doc("PEM private key file", default=None)
    required: bool = doc("starttls only: refuse MAIL before STARTTLS", default=False)


@dataclass(frozen=True)
class ListenerProxyProtocol:
    trusted: tuple[IPNetwork, ...] = doc(
        "load balancers whose PROXY header (v1 or v2) is believed; when set, every connection must start "
        "with one and connections from other addresses are refused (empty: PROXY protocol off)",
        default=(),
    )
    timeout: Duration = doc("the PROXY header must arrive within this time of the connection", default=Duration(10))


@dataclass(frozen=True)
class ListenerConfig:
    name: str = doc("name used in logs, metrics and class rules")
    address: HostPort = doc("HOST:PORT to listen on")
    trusted_networks: tuple[IPNetwork, ...] = doc("clients allowed to relay without AUTH", default=LOOPBACK)
    auth: Literal["none", "optional", "required"] = doc(
        "none: no AUTH offered; optional: AUTH lets untrusted clients relay; required: everyone must AUTH",
        default="none",
    )
    tls: ListenerTLS = doc("TLS on this listener", default_factory=ListenerTLS)
    hostname: str | None = doc("name in the greeting and EHLO reply (default: the machine's FQDN)", default=None)
    max_message_size: Size = doc("largest message accepted (advertised as SIZE)", default=Size(25 * 1024 * 1024))
    max_recipients: int = doc("recipients per message; more get 452 4.5.3", default=500)
    max_line_length: Size = doc("longest line in a message or command, CRLF included", default=Size(10_000))
    max_sessions: int = doc("concurrent sessions on this listener", default=500)
    max_sessions_per_ip: int = doc("concurrent sessions from one client IP", default=50)
    stress_at: float = doc(
        "share of max_sessions from which the listener is under stress: idle and command limits drop to "
        "timeouts.stress_idle (Postfix's ${stress?10}{300})",
        default=0.8,
    )
    stress_sessions_per_ip: int = doc(
        "concurrent sessions from one client IP while under stress: a few addresses cannot hold every slot "
        "(Postfix's anvil keeps the same fairness)",
        default=5,
    )
    max_auth_failures: int = doc("failed AUTH attempts per client IP per 10 minutes before AUTH is refused", default=10)
    plaintext_auth_networks: tuple[IPNetwork, ...] = doc(
        "clients that may AUTH without TLS (nothing crosses a network from loopback)", default=LOOPBACK
    )
    proxy_protocol: ListenerProxyProtocol = doc(
        "PROXY protocol from a TCP load balancer: the client address it carries counts as the client's "
        "(trusted networks, AUTH, per-IP limits, rate limits, audit, Received)",
        default_factory=ListenerProxyProtocol,
    )
    xclient_hosts: tuple[IPNetwork, ...] = doc(
        "hosts that may send XCLIENT (Postfix's smtpd_authorized_xclient_hosts): the client address, name, "
        "HELO and SASL login they carry replace the connection's for the rest of the session, relay "
        "authorization included (empty: XCLIENT refused)",
        default=(),
    )
    xforward_hosts: tuple[IPNetwork, ...] = doc(
        "hosts that may send XFORWARD (Postfix's smtpd_authorized_xforward_hosts; a Postfix with "
        "smtpd_proxy_filter sends it): the client address, name and HELO they carry count for the next "
        "transaction's limits, rate limits, audit line and Received field; relay authorization stays the "
        "forwarding host's (empty: XFORWARD refused)",
        default=(),
    )
    received_auth_user: bool = doc(
        "name the AUTH user in sendguard's Received: field (Postfix's smtpd_sasl_authenticated_header; "
        "off: it tells every recipient a login name)",
        default=False,
    )


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect: Duration = doc("TCP and TLS connect, greeting and EHLO", default=Duration(30))
    command: Duration = doc("reply to MAIL, RCPT, RSET", default=Duration(60))
    data: Duration = doc("transfer of the message and the reply to its final dot", default=Duration(120))


@dataclass(frozen=True)
class UpstreamPool:
    max_connections: int = doc("open upstream connections at most; more sessions wait", default=50)
    idle_timeout: Duration = doc("close an unused upstream connection after", default=Duration(30))
    max_messages_per_connection: int = doc("QUIT and reconnect after this many messages", default=100)


@dataclass(frozen=True)
class UpstreamConfig:
    address: str = doc("maildir:PATH, or HOST:PORT of the upstream MTA", default="maildir:var/maildir")
    tls: Literal["starttls", "implicit", "none", "opportunistic"] = doc(
        "starttls (required), implicit (port 465), opportunistic (STARTTLS if offered), none", default="starttls"
    )
    verify_certificate: bool = doc("verify the upstream's certificate and host name", default=True)
    ca_file: str | None = doc("CA bundle for verifying the upstream (default: the system's)", default=None)
    username: str | None = doc("AUTH user at the upstream", default=None)
    password: str | None = doc("AUTH password; write ${ENV_NAME} to take it from the environment", default=None)
    helo_name: str | None = doc("name sendguard gives in EHLO (default: the machine's FQDN)", default=None)
    send_xforward: bool = doc(
        "when the upstream offers XFORWARD, tell it the original client (address, name, HELO, protocol) "
        "before each MAIL, so that a Postfix after sendguard logs the real client (Postfix's "
        "smtp_send_xforward_command; the upstream must list sendguard in smtpd_authorized_xforward_hosts)",
        default=False,
    )
    timeouts: UpstreamTimeouts = doc("upstream time limits", default_factory=UpstreamTimeouts)
    pool: UpstreamPool = doc("upstream connection reuse", default_factory=UpstreamPool)
    copy_concurrency: int = doc(
        "copies of one message (one per recipient, e.g. personal unsubscribe links) sent at once, each over its "
        "own pooled connection; never more than pool.max_connections",
        default=4,
    )

    @property
    def is_maildir(self) -> bool:
        return self.address.startswith("maildir:")

    @property
    def maildir_path(self) -> str:
        return self.address.removeprefix("maildir:")

    @property
    def hostport(self) -> HostPort:
        return parse_hostport(self.address)


@dataclass(frozen=True)
class MessageLimits:
    bare_newlines: Literal["normalize", "reject"] = doc(
        "bare CR or LF in DATA: normalize to CRLF (Postfix's default) or reject with 550 5.6.0", default="normalize"
    )
    max_header_size: Size = doc("largest header section", default=Size(256 * 1024))
    max_mime_depth: int = doc("deepest MIME nesting (Postfix: 100)", default=50)
    max_received: int = doc(
        "Received: fields before the message counts as looping (Postfix hopcount_limit)", default=50
    )
    strip_headers: tuple[str, ...] = doc(
        "fields removed before relaying (Bcc must never reach the other recipients)", default=("Bcc", "Resent-Bcc")
    )


@dataclass(frozen=True)
class Timeouts:
    idle: Duration = doc("between two client commands (RFC 5321 4.5.3.2: 5 minutes)", default=Duration(300))
    session: Duration = doc("whole client session", default=Duration(1800))
    command: Duration = doc(
        "a whole command line, from its first byte to its end (a trickle is cut with 421 4.4.2)", default=Duration(60)
    )
    stress_idle: Duration = doc(
        "idle and command limits while a listener is under stress (listeners: stress_at)", default=Duration(10)
    )
    shutdown: Duration = doc("on stop, wait this long for transactions in flight", default=Duration(30))


@dataclass(frozen=True)
class ClassHeader:
    name: str = doc("header that states the class; always removed before relaying", default="X-Sendguard-Class")
    trusted_users: tuple[str, ...] = doc("AUTH users whose header may say 'transactional'", default=())
    trusted_listeners: tuple[str, ...] = doc("listeners whose clients may say 'transactional'", default=())
    trusted_networks: tuple[IPNetwork, ...] = doc(
        "no longer supported: a network address proves nothing about who wrote a message", default=()
    )
    declared_transactional: Literal["refuse", "commercial", "monitor", "believe"] = doc(
        "a believed 'transactional' declaration (header or rule) on mail the detector finds clearly commercial: "
        "refuse it (550), treat it as commercial, believe it but log and count (monitor), or believe it",
        default="refuse",
    )

    def __post_init__(self) -> None:
        if self.trusted_networks:
            raise ValueError(
                "trusted_networks: the class header is no longer believed from a network (any program on "
                "it could skip the compliance checks); name the listeners (trusted_listeners) or AUTH "
                "users (trusted_users) whose 'transactional' is believed"
            )


@dataclass(frozen=True)
class DetectorConfig:
    mode: Literal["enforce", "monitor", "off"] = doc(
        "enforce: the detector decides the class where no rule does; monitor: it only logs and counts "
        "what it would decide (rules and default decide); off",
        default="enforce",
    )
    commercial_at: float = doc("score from which a message is commercial", default=4.0)
    grey_from: float = doc("score from which a message is in the grey zone (below commercial_at)", default=2.5)
    grey_outcome: Literal["commercial", "transactional"] = doc(
        "the class of grey-zone mail; when unsure, side with the law", default="commercial"
    )
    weights: dict[str, float] = doc("signal -> weight, replacing the shipped weight", default_factory=dict)
    words_file: str | None = doc("a YAML file in the format of policies/commercial/words.yaml, added", default=None)
    extra_words: dict[str, dict[str, tuple[str, ...]]] = doc(
        "language -> word list -> entries, added to the shipped lists", default_factory=dict
    )

    def __post_init__(self) -> None:
        from policies.commercial import DEFAULT_WEIGHTS, load_word_lists

        if self.grey_from > self.commercial_at:
            raise ValueError(f"grey_from ({self.grey_from}) must not be above commercial_at ({self.commercial_at})")
        unknown = sorted(set(self.weights) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise ValueError(f"weights: unknown signal(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_WEIGHTS)}")
        load_word_lists(self.words_file, self.extra_words)  # ValueError names the bad entry


@dataclass(frozen=True)
class ClassRule:
    message_class: Literal["commercial", "transactional"] = doc("the class this rule gives", key="class")
    listeners: tuple[str, ...] = doc("any of these listeners", default=())
    auth_users: tuple[str, ...] = doc("any of these AUTH users", default=())
    mail_from: tuple[str, ...] = doc("envelope sender matches any of these globs (*@news.example.com)", default=())
    header_from: tuple[str, ...] = doc("an address in From: matches any of these globs", default=())
    headers_present: tuple[str, ...] = doc("any of these header fields is present", default=())
    header_matches: dict[str, str] = doc("header field -> regular expression (case-insensitive)", default_factory=dict)

    def __post_init__(self) -> None:
        for name, pattern in self.header_matches.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"header_matches.{name}: bad regular expression: {exc}") from None
        if not any(
            (
                self.listeners,
                self.auth_users,
                self.mail_from,
                self.header_from,
                self.headers_present,
                self.header_matches,
            )
        ):
            raise ValueError("a class rule needs at least one condition")

    @property
    def envelope_only(self) -> bool:
        return not (self.header_from or self.headers_present or self.header_matches)


@dataclass(frozen=True)
class ClassesConfig:
    default: Literal["commercial", "transactional"] | None = doc(
        "class when no rule matches and the detector is off or in monitor mode (transactional when not given)",
        default=None,
    )
    header: ClassHeader = doc("the class header", default_factory=ClassHeader)
    rules: tuple[ClassRule, ...] = doc("overrides for known cases; the first matching rule wins", default=())
    detector: DetectorConfig = doc("the commercial-mail detector", default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if self.default is not None and self.detector.mode == "enforce":
            raise ValueError(
                "default: has no effect while the detector decides (detector.mode: enforce); give a rule "
                "for the listeners, users or senders that are always commercial, or set detector.mode: "
                "monitor or off"
            )

    @property
    def fallback(self) -> str:
        return self.default or "transactional"


@dataclass(frozen=True)
class PolicyEntry:
    """One entry of the ordered policy list: a registered policy and how to run it."""

    name: str
    id: str
    mode: Literal["enforce", "monitor"]
    on_error: Literal["tempfail", "accept"]
    classes: tuple[str, ...]
    timeout: Duration
    options: Any
    policy_class: type[Policy]


@dataclass(frozen=True)
class _PolicyCommon:
    name: str = doc("a registered policy")
    id: str | None = doc("unique id when one policy appears twice (default: the name)", default=None)
    mode: Literal["enforce", "monitor"] = doc(
        "monitor: log and count the decision, let the mail pass", default="enforce"
    )
    on_error: Literal["tempfail", "accept"] = doc(
        "when the policy itself fails: 451 or let the mail pass", default="tempfail"
    )
    classes: tuple[Literal["commercial", "transactional"], ...] | None = doc(
        "classes it applies to (default: the policy's own)", default=None
    )
    timeout: Duration = doc("time limit per check", default=Duration(10))


@dataclass(frozen=True)
class AuditConfig:
    path: str | None = doc("JSON-lines file, one line per transaction; null disables", default="var/audit.jsonl")
    max_size: Size = doc("rotate when the file reaches this size", default=Size(100 * 1024 * 1024))
    keep: int = doc("rotated files kept", default=10)


@dataclass(frozen=True)
class SpoolConfig:
    """The retry queue of per-recipient copies and DSNs (proxy/relay/spool.py)."""

    path: str = doc(
        "SQLite file (mode 0600) of copies and DSNs waiting for a retry; written and fsync'd before the 250",
        default="var/spool.db",
    )
    max_age: Duration = doc(
        "give up on a queued message after this long (a DSN to the sender), like Postfix's maximal_queue_lifetime",
        default=Duration(5 * 86400),
    )
    retry_min: Duration = doc("first retry after this long, then doubling each time", default=Duration(60))
    retry_max: Duration = doc("longest wait between two retries", default=Duration(3600))
    interval: Duration = doc("how often the queue is looked at for messages due", default=Duration(10))


@dataclass(frozen=True)
class LoggingConfig:
    format: Literal["json", "logfmt"] = doc("log line format on stdout", default="logfmt")
    level: Literal["debug", "info", "warning", "error"] = doc("lowest level logged", default="info")


@dataclass(frozen=True)
class HTTPConfig:
    address: HostPort | None = doc(
        "HOST:PORT for /metrics, /healthz, /readyz; null disables", default=HostPort("127.0.0.1", 9025)
    )


@dataclass(frozen=True)
class ReloadConfig:
    watch: bool = doc("reload when the file changes (SIGHUP always reloads)", default=True)
    interval: Duration = doc("how often to look at the file", default=Duration(2))


@dataclass(frozen=True)
class StoresConfig:
    state: LimitStoreConfig = doc(
        "shared state (pauses, counters, rate-limit buckets): memory for one instance, redis for several",
        default_factory=LimitStoreConfig,
    )
    consent: ConsentStoreConfig = doc(
        "consent records: sqlite (one file, one instance) or postgres (shared by several instances)",
        default_factory=ConsentStoreConfig,
    )


@dataclass(frozen=True)
class Settings:
    listeners: tuple[ListenerConfig, ...] = doc("where clients connect")
    upstream: UpstreamConfig = doc("where accepted mail goes", default_factory=UpstreamConfig)
    workers: Workers = doc(
        "processes that accept SMTP connections (auto: one per core); above 1 a supervising parent holds the "
        "listening sockets, restarts a worker that dies and runs the HTTP side and background jobs once; "
        "needs stores.state.backend: redis. A change needs a restart",
        default=Workers(1),
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = doc(
        "the event loop of each process: uvloop (libuv, pip install 'sendguard[fast]'), the standard asyncio "
        "one, or auto: uvloop when it is installed. A change needs a restart",
        default="auto",
    )
    users_file: str = doc("AUTH users and salted password hashes (sendguard user add)", default="var/users")
    message: MessageLimits = doc("message checks made before any policy", default_factory=MessageLimits)
    timeouts: Timeouts = doc("client time limits", default_factory=Timeouts)
    classes: ClassesConfig = doc("how a transaction becomes commercial or transactional", default_factory=ClassesConfig)
    policies: tuple[PolicyEntry, ...] = doc("policies in the order they run", default=())
    stores: StoresConfig = doc("where state lives", default_factory=StoresConfig)
    backoff: BackoffConfig = doc("pause sending when the upstream pushes back", default_factory=BackoffConfig)
    bounces: BounceConfig = doc(
        "suppress dead addresses; pause senders that bounce too much", default_factory=BounceConfig
    )
    complaints: ComplaintConfig = doc(
        "feedback reports (ARF): opt the recipient out; pause senders that draw too many complaints",
        default_factory=ComplaintConfig,
    )
    dkim: DKIMConfig = doc("DKIM signing, the last change before the upstream", default_factory=DKIMConfig)
    dns: DNSConfig = doc("resolver, sending IPs and domains, blocklist watch", default_factory=DNSConfig)
    audit: AuditConfig = doc("the audit log", default_factory=AuditConfig)
    spool: SpoolConfig = doc(
        "the retry queue for per-recipient copies the upstream refused for now, and DSNs",
        default_factory=SpoolConfig,
    )
    logging: LoggingConfig = doc("logs on stdout", default_factory=LoggingConfig)
    http: HTTPConfig = doc("metrics and health", default_factory=HTTPConfig)
    unsubscribe: UnsubscribeConfig = doc(
        "one-click unsubscribe links (RFC 8058) and the recipient's own pages", default_factory=UnsubscribeConfig
    )
    reload: ReloadConfig = doc("config reloading", default_factory=ReloadConfig)
    api: ApiConfig = doc("the consent API for CRMs and sign-up forms (off by default)", default_factory=ApiConfig)
    webhooks: WebhooksConfig = doc(
        "opt-outs, suppressions, complaints and pauses pushed to URLs, from a durable outbox",
        default_factory=WebhooksConfig,
    )
    #: Set by the loader: where the file came from and a hash of its text.
    source: str = field(default="", metadata={"internal": True})
    digest: str = field(default="", metadata={"internal": True})
    #: What the loader accepted but doubts (bare numbers for durations and sizes), as text.
    load_warnings: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def compliance_warnings(self) -> list[str]:
        """What this config leaves of the law unchecked (empty when every check is enforced)."""
        enforced = {entry.name for entry in self.policies if entry.mode == "enforce"}
        missing = [name for name in ("visible_recipients", "unsubscribe", "consent") if name not in enforced]
        if not missing:
            return []
        what = {
            "visible_recipients": "mass mail with every recipient in To/Cc (AVG)",
            "unsubscribe": "commercial mail without a way to unsubscribe (Tw art. 11.7)",
            "consent": "commercial mail to people who never consented (Tw art. 11.7)",
        }
        return [f"no enforcing {name} policy: {what[name]} passes unchecked" for name in missing]

    def needs(self, resource: str) -> bool:
        """True when a configured policy needs this shared resource (see Policy.needs)."""
        return any(resource in entry.policy_class.needs for entry in self.policies)

    def headers_added(self, message_class: str) -> frozenset[str]:
        """Header fields (lower case) an enforcing policy adds to every message of the class."""
        return frozenset(
            name.lower()
            for entry in self.policies
            if entry.mode == "enforce" and message_class in entry.classes
            for name in entry.policy_class.headers_added(entry.options)
        )

    @property
    def instruction_headers(self) -> tuple[str, ...]:
        """Every header that instructs sendguard (class, topic ...): removed before relaying."""
        names = [self.classes.header.name]
        for entry in self.policies:
            names.extend(entry.policy_class.instruction_headers(entry.options))
        return tuple(dict.fromkeys(names))

    def listener(self, name: str) -> ListenerConfig:
        for listener in self.listeners:
            if listener.name == name:
                return listener
        raise KeyError(name)


# ---- loading -------------------------------------------------------------------------------


def _convert_policy(conv: Converter, node: yaml.Node, path: str) -> Any:
    """A policy entry: the common keys, then the policy's own options, flat in one mapping."""
    items = conv.mapping_items(node, path)
    if items is None:
        return INVALID
    name_node = next((value for key, _, value in items if key == "name"), None)
    if name_node is None:
        conv.error(node, f"{path}.name", "required key is missing: which policy is this?")
        return INVALID
    name = conv.scalar_text(name_node, f"{path}.name")
    if name is None:
        return INVALID
    policy_class = REGISTRY.get(name)
    if policy_class is None:
        conv.error(name_node, f"{path}.name", f"unknown policy {name!r}; known policies: {', '.join(sorted(REGISTRY))}")
        return INVALID
    common_keys = {f.name for f in dataclasses.fields(_PolicyCommon)}
    option_fields = {f.name for f in dataclasses.fields(policy_class.Options)}
    clash = common_keys & option_fields
    if clash:  # a programming error in the policy, not a config error
        raise RuntimeError(f"policy {name} options clash with common keys: {clash}")
    known = common_keys | option_fields
    unknown = set()
    for key, key_node, _ in items:
        if key not in known:
            unknown.add(key)
            hint = difflib.get_close_matches(key, sorted(known), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; {name} knows: {', '.join(sorted(known))}"
            conv.error(key_node, f"{path}.{key}", f"unknown key{extra}")
    common = conv.dataclass(node, _PolicyCommon, path, skip=frozenset(option_fields | unknown))
    options = conv.dataclass(node, policy_class.Options, path, skip=frozenset(common_keys | unknown))
    if unknown:
        return INVALID
    if is_invalid(common) or is_invalid(options):
        return INVALID
    return PolicyEntry(
        name=name,
        id=common.id or name,
        mode=common.mode,
        on_error=common.on_error,
        classes=tuple(common.classes) if common.classes is not None else policy_class.default_classes,
        timeout=common.timeout,
        options=options,
        policy_class=policy_class,
    )


def load_config(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Read, validate and return the settings; raise ConfigError listing every problem.

    ``overrides`` are the ``serve`` flags: ``listen`` (first listener's address),
    ``upstream`` (HOST:PORT or maildir:PATH) and ``http`` (HOST:PORT).
    """
    filename = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(filename, None, "", f"cannot read the file: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(filename, None, "", f"the file is not UTF-8: {exc}")]) from exc
    return load_config_text(text, filename, environ=environ, overrides=overrides)


def load_config_text(
    text: str,
    filename: str = "<config>",
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    node = compose(text, filename)
    if node is None:
        raise ConfigError(
            [ConfigIssue(filename, None, "", "the file is empty; it needs at least a listeners: section")]
        )
    conv = Converter(filename, environ)
    conv.hooks[PolicyEntry] = _convert_policy
    settings = conv.dataclass(node, Settings, "")
    if is_invalid(settings):
        raise ConfigError(conv.issues)
    settings = dataclasses.replace(
        settings,
        source=filename,
        digest=hashlib.sha256(text.encode("utf-8")).hexdigest()[:16],
        load_warnings=tuple(str(warning) for warning in conv.warnings),
    )
    if overrides:
        settings = _apply_overrides(settings, overrides, conv)
    _validate(settings, conv)
    if conv.issues:
        raise ConfigError(conv.issues)
    return settings


def parse_upstream_address(text: str) -> str:
    """Check a ``--upstream`` value: ``maildir:PATH`` or ``HOST:PORT``."""
    if text.startswith("maildir:"):
        if not text.removeprefix("maildir:"):
            raise ValueError("maildir: needs a path, e.g. maildir:var/maildir")
        return text
    parse_hostport(text)
    return text


def _apply_overrides(settings: Settings, overrides: Mapping[str, str], conv: Converter) -> Settings:
    def listen(s: Settings, address: HostPort) -> Settings:
        return dataclasses.replace(
            s, listeners=(dataclasses.replace(s.listeners[0], address=address), *s.listeners[1:])
        )

    flags: tuple[tuple[str, Callable[[str], Any], Callable[[Settings, Any], Settings]], ...] = (
        ("listen", parse_hostport, listen),
        (
            "upstream",
            parse_upstream_address,
            lambda s, address: dataclasses.replace(s, upstream=dataclasses.replace(s.upstream, address=address)),
        ),
        ("workers", parse_workers, lambda s, workers: dataclasses.replace(s, workers=workers)),
        ("http", parse_hostport, lambda s, address: dataclasses.replace(s, http=HTTPConfig(address=address))),
    )
    for key, parse, apply in flags:
        if not overrides.get(key):
            continue
        try:
            value = parse(overrides[key])
        except ValueError as exc:
            conv.error_at(f"--{key}", str(exc))
        else:
            settings = apply(settings, value)
    return settings


#: RFC 5321 section 4.5.3.2.6: a client waits 10 minutes for the reply to the final dot.
CLIENT_DATA_TERMINATION_WAIT = 600.0


#: The listener label of the transactions ``sendguard milter`` runs (audit line, metrics, rules).
MILTER_LISTENER = "milter"


def _validate(settings: Settings, conv: Converter) -> None:
    """Cross-field rules, one place, each reported with the path of the value at fault."""
    err = conv.error_at
    if settings.workers > 1 and settings.stores.state.backend == "memory":
        # Each worker process would keep its own budgets, pauses and bounce counts: a limit of
        # 100/hour would let 100 per worker through, and a pause would hold in one worker only.
        err(
            "workers",
            f"workers: {int(settings.workers)} needs the shared state in Redis (the in-memory store is per "
            "process: each worker would keep its own rate-limit budgets and pauses); set stores.state.backend: "
            "redis with stores.state.url, or run workers: 1",
        )
    if settings.event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        err("event_loop", "uvloop is not installed: pip install 'sendguard[fast]', or set event_loop: auto")
    if not settings.listeners:
        err("listeners", "at least one listener is needed")
    names: set[str] = set()
    addresses: set[tuple[str, int]] = set()
    for i, listener in enumerate(settings.listeners):
        base = f"listeners[{i}]"
        if listener.name in names:
            err(f"{base}.name", f"listener name {listener.name!r} is used twice")
        names.add(listener.name)
        key = (listener.address.host, listener.address.port)
        if listener.address.port and key in addresses:
            err(f"{base}.address", f"address {listener.address} is used by two listeners")
        addresses.add(key)
        for j, network in enumerate(listener.trusted_networks):
            # A trusted network lets anyone in it relay without a password: a prefix that
            # covers a large part of the Internet makes an open relay (Postfix T13: fail closed).
            if _too_wide(network):
                err(
                    f"{base}.trusted_networks[{j}]",
                    f"{network} would make sendguard an open relay; list the networks of your own clients",
                )
        for j, network in enumerate(listener.proxy_protocol.trusted):
            # Whoever may send a PROXY header chooses the client address sendguard believes,
            # trusted networks included: list the balancers, not the Internet.
            if _too_wide(network):
                err(
                    f"{base}.proxy_protocol.trusted[{j}]",
                    f"{network} would let anyone choose the client address sendguard sees; list your load balancers",
                )
        for field_name, hosts in (
            ("xclient_hosts", listener.xclient_hosts),
            ("xforward_hosts", listener.xforward_hosts),
        ):
            for j, network in enumerate(hosts):
                # Whoever may send XCLIENT or XFORWARD chooses the client address sendguard
                # believes (XCLIENT: and its login): list the forwarding MTAs, not the Internet.
                if _too_wide(network):
                    err(
                        f"{base}.{field_name}[{j}]",
                        f"{network} would let anyone choose the client address sendguard sees; "
                        "list the MTAs in front of sendguard",
                    )
        if listener.tls.mode != "none":
            if not listener.tls.cert or not listener.tls.key:
                err(f"{base}.tls", "cert and key must be given together when TLS is on")
            else:
                for attr in ("cert", "key"):
                    file = getattr(listener.tls, attr)
                    if not os.path.isfile(file):
                        err(f"{base}.tls.{attr}", f"file not found: {file}")
        elif listener.tls.required:
            err(f"{base}.tls.required", "requires tls.mode: starttls")
        if listener.tls.required and listener.tls.mode == "implicit":
            err(f"{base}.tls.required", "implicit TLS is always required; set required only with starttls")
        if listener.proxy_protocol.trusted and listener.tls.mode == "implicit":
            # The PROXY header comes before the TLS handshake, and the handshake is made before
            # sendguard reads a byte of an implicit-TLS connection.
            err(
                f"{base}.proxy_protocol",
                "PROXY protocol cannot be combined with implicit TLS on one listener; use starttls, "
                "or let the load balancer terminate TLS",
            )
        if listener.proxy_protocol.trusted and float(listener.proxy_protocol.timeout) < 1:
            err(f"{base}.proxy_protocol.timeout", "must be at least 1s")
        if listener.max_message_size < 1024:
            err(f"{base}.max_message_size", "must be at least 1KB")
        if listener.max_recipients < 1:
            err(f"{base}.max_recipients", "must be at least 1")
        if listener.max_line_length < 1000:
            err(f"{base}.max_line_length", "must be at least 1000 (RFC 5321 4.5.3.1.6)")
        if listener.max_sessions < 1 or listener.max_sessions_per_ip < 1 or listener.stress_sessions_per_ip < 1:
            err(f"{base}.max_sessions", "session limits must be at least 1")
        if not 0 < listener.stress_at <= 1:
            err(f"{base}.stress_at", "must be a share of max_sessions, above 0 and at most 1")

    upstream = settings.upstream
    if not upstream.is_maildir:
        try:
            parse_hostport(upstream.address)
        except ValueError as exc:
            err("upstream.address", f"{exc}; or write maildir:PATH")
        if bool(upstream.username) != bool(upstream.password):
            err("upstream.username", "username and password must be given together")
        if upstream.username and upstream.tls == "none":
            err("upstream.tls", "sending a password without TLS is refused; use starttls or implicit")
        if upstream.ca_file and not os.path.isfile(upstream.ca_file):
            err("upstream.ca_file", f"file not found: {upstream.ca_file}")
    elif not upstream.maildir_path:
        err("upstream.address", "maildir: needs a path")
    if upstream.pool.max_connections < 1:
        err("upstream.pool.max_connections", "must be at least 1")
    if upstream.copy_concurrency < 1:
        err("upstream.copy_concurrency", "must be at least 1 (1: copies one after another)")

    # "milter" names the transactions `sendguard milter` runs (the MTA's sessions): rules and
    # trusted_listeners may name it, a listener may not be called so.
    if MILTER_LISTENER in names:
        err("listeners", f"the listener name {MILTER_LISTENER!r} is reserved for sendguard milter")
    names.add(MILTER_LISTENER)
    for i, rule in enumerate(settings.classes.rules):
        for j, listener_name in enumerate(rule.listeners):
            if listener_name not in names:
                err(f"classes.rules[{i}].listeners[{j}]", f"no listener is called {listener_name!r}")
    for j, listener_name in enumerate(settings.classes.header.trusted_listeners):
        if listener_name not in names:
            err(f"classes.header.trusted_listeners[{j}]", f"no listener is called {listener_name!r}")

    ids: set[str] = set()
    for i, entry in enumerate(settings.policies):
        if entry.id in ids:
            err(f"policies[{i}].id", f"policy id {entry.id!r} appears twice; give one of them its own id")
        ids.add(entry.id)
        for cls in entry.classes:
            if cls not in MESSAGE_CLASSES:
                err(f"policies[{i}].classes", f"unknown class {cls!r}")
        if entry.policy_class.fails_closed and entry.on_error == "accept" and entry.mode == "enforce":
            err(
                f"policies[{i}].on_error",
                f"{entry.name} must not pass mail it cannot check (the store down would "
                "let commercial mail through without consent); use on_error: tempfail, or mode: monitor",
            )
        for j, spec in enumerate(getattr(entry.options, "limits", ()) if entry.name == "rate_limit" else ()):
            if spec.hold >= entry.timeout:
                err(
                    f"policies[{i}].limits[{j}].hold",
                    f"must be shorter than the policy's timeout ({entry.timeout:g}s), or the wait ends in 451 4.3.0",
                )

    # The time budget after the final dot must nest inside the client's patience:
    # policies run one after another, then the upstream transfer.
    budget = sum(e.timeout for e in settings.policies) + upstream.timeouts.data
    if budget >= CLIENT_DATA_TERMINATION_WAIT:
        err(
            "upstream.timeouts.data",
            f"policy timeouts plus the upstream data timeout add up to {budget:.0f}s; "
            f"clients give up after {CLIENT_DATA_TERMINATION_WAIT:.0f}s (RFC 5321 4.5.3.2.6), which risks duplicates",
        )
    if settings.timeouts.idle < 1:
        err("timeouts.idle", "must be at least 1s")
    if settings.timeouts.command < 1:
        err("timeouts.command", "must be at least 1s")
    if settings.timeouts.stress_idle < 1:
        err("timeouts.stress_idle", "must be at least 1s")
    if settings.reload.interval <= 0:
        err("reload.interval", "must be positive")
    if settings.audit.keep < 0:
        err("audit.keep", "must not be negative")
    spool = settings.spool
    for name in ("max_age", "retry_min", "retry_max", "interval"):
        if getattr(spool, name) <= 0:
            err(f"spool.{name}", "must be positive")
    if spool.retry_max < spool.retry_min:
        err("spool.retry_max", "must not be shorter than spool.retry_min")
    for path, message in dkim_config_problems(settings.dkim):
        err(f"dkim.{path}", message)
    _validate_unsubscribe(settings, conv)
    _validate_api(settings, conv)
    names_seen: set[str] = set()
    for i, backoff_rule in enumerate(settings.backoff.rules):
        if backoff_rule.name in names_seen:
            err(f"backoff.rules[{i}].name", f"rule name {backoff_rule.name!r} is used twice")
        names_seen.add(backoff_rule.name)


def _validate_unsubscribe(settings: Settings, conv: Converter) -> None:
    """The unsubscribe section against the rest: who needs it, and where it listens."""
    err = conv.error_at
    unsubscribe = settings.unsubscribe
    for i, entry in enumerate(settings.policies):
        wants = "unsubscribe" in entry.policy_class.needs or getattr(entry.options, "remedy", None) == "add_footer"
        if wants and not unsubscribe.enabled:
            err(
                f"policies[{i}]",
                f"{entry.name} needs the unsubscribe: section enabled (enabled: true, base_url, keys, company, "
                "contact); make a key with: sendguard unsubscribe keygen",
            )
            break
    if not unsubscribe.enabled:
        return
    # Port 0 (tests) binds a fresh port each time, so it never clashes.
    smtp = {(listener.address.host, listener.address.port) for listener in settings.listeners}
    pages = (unsubscribe.listen.host, unsubscribe.listen.port)
    http = settings.http.address
    if unsubscribe.listen.port and http is not None and pages == (http.host, http.port):
        err(
            "unsubscribe.listen",
            "must differ from http.address: the unsubscribe pages face the Internet, /metrics must not",
        )
    elif unsubscribe.listen.port and pages in smtp:
        err("unsubscribe.listen", f"{unsubscribe.listen} is already used by an SMTP listener")
    if unsubscribe.mailto is not None and unsubscribe.mailto.listen is not None and unsubscribe.mailto.listen.port:
        mailto = unsubscribe.mailto.listen
        others = smtp | {pages} | ({(http.host, http.port)} if http is not None else set())
        if (mailto.host, mailto.port) in others:
            err("unsubscribe.mailto.listen", f"{mailto} is already used by another listener")
    for attr in ("tls_cert", "tls_key"):
        file = getattr(unsubscribe, attr)
        if file and not os.path.isfile(file):
            err(f"unsubscribe.{attr}", f"file not found: {file}")


def _validate_api(settings: Settings, conv: Converter) -> None:
    """The API's address against the other listeners: never the metrics one."""
    address = settings.api.address
    if address is None or not address.port:  # port 0 (tests) binds a fresh port each time
        return
    here = (address.host, address.port)
    http = settings.http.address
    if http is not None and here == (http.host, http.port):
        conv.error_at("api.address", "must differ from http.address: /metrics must not take consent writes")
        return
    others = {(listener.address.host, listener.address.port) for listener in settings.listeners}
    if settings.unsubscribe.enabled:
        others.add((settings.unsubscribe.listen.host, settings.unsubscribe.listen.port))
    if here in others:
        conv.error_at("api.address", f"{address} is already used by another listener")
