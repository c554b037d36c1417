"""What the sessions share: per listener (``ListenerState``) and for the process's whole
life (``Services``: metrics, the audit log, the users file, the machine's name, the retry
queue)."""

from __future__ import annotations

import logging
import math
import ssl
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from proxy.config.settings import ListenerConfig
from proxy.observability.logsetup import AuditLog
from proxy.observability.metrics import Metrics
from proxy.relay.spool import Spool
from proxy.schema import address_in
from proxy.smtp.auth import AuthFailureTracker, UserStore

__all__ = ("ListenerState", "Services", "build_server_tls_context")

log = logging.getLogger("sendguard.smtp")


class StressAware(Protocol):
    def stress_began(self) -> None:
        """The listener came under stress: shorten this session's idle and command limits now."""


@dataclass
class Services:
    metrics: Metrics
    audit: AuditLog
    users: UserStore
    hostname: str
    #: The retry queue for per-recipient copies and DSNs (None: nothing can be queued, so a
    #: copy refused for now makes the whole message a 451).
    spool: Spool | None = None


def build_server_tls_context(config: ListenerConfig) -> ssl.SSLContext | None:
    if config.tls.mode == "none" or not config.tls.cert or not config.tls.key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls.cert, config.tls.key)
    return context


class ListenerState:
    """Shared by every session of one listener: its config, TLS context and counters."""

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.tls_context = build_server_tls_context(config)
        self.active = 0
        self.per_ip: Counter[str] = Counter()
        self.auth_failures = AuthFailureTracker(config.max_auth_failures)
        self.sessions: set[StressAware] = set()
        #: Under stress (Postfix's ``${stress?...}``): sessions past ``stress_at`` of
        #: ``max_sessions``; idle and command limits are ``timeouts.stress_idle``.
        self.stress = False

    @property
    def name(self) -> str:
        return self.config.name

    @staticmethod
    def check_tls(config: ListenerConfig) -> None:
        """Load the certificate and key into a throwaway context: raises (ssl.SSLError,
        OSError) on a bad pair, before anything is changed."""
        build_server_tls_context(config)

    def update(self, config: ListenerConfig) -> None:
        """Take a reloaded config. The certificate is reloaded into the same SSLContext,
        so a renewed certificate takes effect for new handshakes without a restart."""
        self.config = config
        self.auth_failures.limit = config.max_auth_failures
        if self.tls_context is not None and config.tls.cert and config.tls.key:
            self.tls_context.load_cert_chain(config.tls.cert, config.tls.key)

    def update_stress(self, metrics: Metrics) -> None:
        """Enter stress when the sessions reach ``stress_at`` of the cap; leave it when they
        fall a twentieth of the cap (at least one session) below, so that one session coming
        and going at the line does not flap. Logged once each way, and the gauge follows."""
        config = self.config
        start = max(1, math.ceil(config.max_sessions * config.stress_at))
        if not self.stress and self.active >= start:
            self.stress = True
            log.warning(
                "listener %s under stress: %d of %d sessions; idle and command limits are now short",
                self.name,
                self.active,
                config.max_sessions,
            )
            metrics.listener_stress.labels(self.name).set(1)
            for session in list(self.sessions):
                session.stress_began()
        elif self.stress and self.active < start - max(1, config.max_sessions // 20):
            self.stress = False
            log.warning(
                "listener %s no longer under stress: %d of %d sessions", self.name, self.active, config.max_sessions
            )
            metrics.listener_stress.labels(self.name).set(0)

    def is_trusted(self, ip: str) -> bool:
        return address_in(ip, self.config.trusted_networks)
