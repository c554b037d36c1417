"""Every Prometheus metric sendguard exports, defined in one place.

Names start with ``sendguard_``; labels come from bounded sets (listener names, classes,
policy ids, outcomes, code classes), never from addresses. Every label combination that
can occur is created at start, at 0, so dashboards and alerts see a series before the
first event (rspamd does the same for its actions).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from policies.base import MESSAGE_CLASSES

if TYPE_CHECKING:
    from proxy.stores.pauses import Pause

__all__ = ("FORGOTTEN_AT_ZERO", "Metrics")

# The *_created series double the number of series and no dashboard or alert uses them; a
# counter's reset shows in rate() anyway. Process-wide in prometheus_client: set at import.
disable_created_metrics()  # type: ignore[no-untyped-call]

MESSAGE_OUTCOMES = ("delivered", "rejected", "tempfailed", "abandoned")
#: A recipient's final outcome, counted once when its transaction ends: delivered, queued
#: (its copy waits in the retry queue), refused by sendguard (a policy, a pause, a
#: suppression, the address syntax), refused by the upstream, refused for now (either side),
#: or abandoned (the client left before the message was sent).
RECIPIENT_OUTCOMES = ("delivered", "queued", "refused_policy", "refused_upstream", "tempfailed", "abandoned")
POLICY_ACTIONS = ("accept", "reject", "tempfail", "error")
UPSTREAM_STAGES = ("connect", "mail", "rcpt", "data")
#: sendguard_transaction_duration_seconds: a transaction lasts seconds to minutes (DATA).
_TRANSACTION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: sendguard_consent_lookups_total: what a consent look-up asked and how it ended.
CONSENT_OPERATIONS = ("basis", "history")
UPSTREAM_CLASSES = ("2xx", "4xx", "5xx", "timeout", "disconnected", "error", "auth_failed", "tls_failed")
CLASSES_OR_UNKNOWN = (*MESSAGE_CLASSES, "unknown")
#: Values of the ``decided_by`` label of sendguard_classifications_total (proxy/classify.py).
DECIDED_BY = (
    "header",
    "rule",
    "default",
    "promotion",
    "fundraising",
    "ideological",
    "outreach",
    "bulk_mail",
    "grey_zone",
    "transactional",
    "conversation",
    "discussion_list",
    "weak_signals",
    "declared_but_commercial",
)
_PAUSE_SCOPES = ("class", "sender", "all")
#: The retry queue (proxy/relay/spool.py): what a row is, and what became of an attempt.
SPOOL_KINDS = ("copy", "dsn")
SPOOL_RESULTS = ("delivered", "deferred", "failed")
#: Gauges whose series come and go (the config digest, a pause's end). With several worker
#: processes prometheus_client keeps each process's values in a file, where ``remove()`` and
#: ``clear()`` cannot reach: a series is set to 0 before it is removed, and the aggregating
#: collector (proxy/supervisor.py) leaves out the zeros of these families.
FORGOTTEN_AT_ZERO = frozenset({"sendguard_config_info", "sendguard_pause_until_timestamp_seconds"})
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, version: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # process_* (CPU, memory, open fds, start time) and python_info, as every exporter has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "sendguard_build_info",
            "Version of sendguard",
            ["version", "python"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.build_info.labels(version, platform.python_version()).set(1)
        self.config_info = Gauge(
            "sendguard_config_info",
            "Hash of the running config file",
            ["digest"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.config_reloads = Counter(
            "sendguard_config_reloads_total", "Config reloads by result", ["result"], registry=r
        )
        self.config_last_reload_success = Gauge(
            "sendguard_config_last_reload_success",
            "1 when the last reload succeeded, 0 when it was refused",
            multiprocess_mode="livemin",
            registry=r,
        )
        self.config_last_reload_time = Gauge(
            "sendguard_config_last_reload_timestamp_seconds",
            "When the config was last (re)loaded",
            multiprocess_mode="livemax",
            registry=r,
        )
        for result in ("success", "failure"):
            self.config_reloads.labels(result)
        self.config_last_reload_success.set(1)

        self.sessions = Counter(
            "sendguard_sessions_total", "Client sessions by listener and outcome", ["listener", "outcome"], registry=r
        )
        self.sessions_active = Gauge(
            "sendguard_sessions_active",
            "Open client sessions",
            ["listener"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.listener_stress = Gauge(
            "sendguard_listener_stress",
            "1 while the listener's sessions are past stress_at of max_sessions (short idle and command limits)",
            ["listener"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.auth = Counter("sendguard_auth_total", "AUTH attempts by result", ["listener", "result"], registry=r)
        self.messages = Counter(
            "sendguard_messages_total",
            "Transactions by listener, class and outcome",
            ["listener", "class", "outcome"],
            registry=r,
        )
        self.recipients = Counter(
            "sendguard_recipients_total",
            "Recipients by listener, class and final outcome, counted when their transaction ends",
            ["listener", "class", "outcome"],
            registry=r,
        )
        self.message_size = Histogram(
            "sendguard_message_size_bytes",
            "Size of messages received",
            buckets=(1e3, 1e4, 5e4, 1e5, 5e5, 1e6, 5e6, 1e7, 2.5e7, 5e7),
            registry=r,
        )
        self.classifications = Counter(
            "sendguard_classifications_total",
            "Final class of each message and what decided it (header, rule, default, the detector's "
            "deciding signal group, the grey zone, a transactional declaration overruled)",
            ["class", "decided_by"],
            registry=r,
        )
        self.detector_verdicts = Counter(
            "sendguard_detector_verdicts_total",
            "Verdicts of the commercial-mail detector, by the detector's mode",
            ["verdict", "mode"],
            registry=r,
        )
        self.declared_transactional = Counter(
            "sendguard_declared_transactional_total",
            "Believed transactional declarations on mail the detector finds commercial, by what was done",
            ["action"],
            registry=r,
        )
        for message_class in MESSAGE_CLASSES:
            for decided_by in DECIDED_BY:
                self.classifications.labels(message_class, decided_by)
        for verdict in ("commercial", "grey", "transactional"):
            for mode in ("enforce", "monitor"):
                self.detector_verdicts.labels(verdict, mode)
        for action in ("refuse", "commercial", "monitor", "believe"):
            self.declared_transactional.labels(action)
        self.policy_verdicts = Counter(
            "sendguard_policy_verdicts_total", "Policy decisions", ["policy", "action", "mode"], registry=r
        )
        self.policy_errors = Counter(
            "sendguard_policy_errors_total", "Policy failures and timeouts", ["policy"], registry=r
        )
        self.policy_duration = Histogram(
            "sendguard_policy_stage_duration_seconds",
            "Time spent in the policies per SMTP stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.policy_latency = Histogram(
            "sendguard_policy_duration_seconds",
            "Time one policy took for one check (any stage), by policy id",
            ["policy"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_replies = Counter(
            "sendguard_upstream_replies_total",
            "Upstream replies by stage and code class (2xx, 4xx, 5xx, or how the attempt failed)",
            ["stage", "code_class"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "sendguard_upstream_stage_duration_seconds",
            "Time waiting for the upstream per stage (connect: TCP, TLS, EHLO and AUTH of a new connection)",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_pool_wait = Histogram(
            "sendguard_upstream_pool_wait_seconds",
            "Time a transaction waited for a free upstream connection slot",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_up = Gauge(
            "sendguard_upstream_up",
            "1 while the upstream's last connection attempt or reply worked, 0 after a failed attempt",
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.upstream_up.set(1)  # nothing tried yet: nothing known to be wrong (as /readyz)
        self.transactions_in_flight = Gauge(
            "sendguard_transactions_in_flight",
            "Transactions between MAIL and their end",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.transaction_duration = Histogram(
            "sendguard_transaction_duration_seconds",
            "Time from MAIL to the end of a transaction, by outcome",
            ["outcome"],
            buckets=_TRANSACTION_BUCKETS,
            registry=r,
        )
        for outcome in MESSAGE_OUTCOMES:
            self.transaction_duration.labels(outcome)
        self.tls_transactions = Counter(
            "sendguard_tls_transactions_total",
            "Transactions by listener and whether the client's session used TLS",
            ["listener", "tls"],
            registry=r,
        )
        self.ratelimit_refusals = Counter(
            "sendguard_ratelimit_refusals_total",
            "Refusals by the rate_limit policy, by the configured limit's name",
            ["limit"],
            registry=r,
        )
        self.pause_until = Gauge(
            "sendguard_pause_until_timestamp_seconds",
            "When the latest pause in force ends, by scope and reason (the rule or check that paused)",
            ["scope", "reason"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.consent_lookups = Counter(
            "sendguard_consent_lookups_total",
            "Consent-store look-ups by the consent policy, by operation and result (ok, error)",
            ["operation", "result"],
            registry=r,
        )
        self.consent_lookup_duration = Histogram(
            "sendguard_consent_lookup_duration_seconds",
            "Time of one consent-store look-up by the consent policy",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for operation in CONSENT_OPERATIONS:
            self.consent_lookup_duration.labels(operation)
            for result in ("ok", "error"):
                self.consent_lookups.labels(operation, result)
        self.upstream_connections = Gauge(
            "sendguard_upstream_connections",
            "Upstream connections by state",
            ["state"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.backoff_matches = Counter(
            "sendguard_backoff_matches_total", "Upstream replies that matched a backoff rule", ["rule"], registry=r
        )
        self.backoff_pauses = Counter(
            "sendguard_backoff_pauses_total", "Pauses started by a backoff rule", ["rule", "scope"], registry=r
        )
        self.pauses_active = Gauge(
            "sendguard_pauses_active",
            "Pauses in force, by scope",
            ["scope"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.paused_transactions = Counter(
            "sendguard_paused_transactions_total", "Transactions deferred because of a pause", ["scope"], registry=r
        )
        self.state_errors = Counter(
            "sendguard_state_store_errors_total",
            "Failed calls to the shared state store (Redis)",
            ["operation"],
            registry=r,
        )
        self._pause_counts: tuple[int, ...] = (0, 0, 0)
        self._digest: str | None = None
        self._blocklist_keys: set[tuple[str, str]] = set()
        self._pause_ends: dict[tuple[str, str], float] = {}
        for scope in _PAUSE_SCOPES:
            self.pauses_active.labels(scope)
            self.paused_transactions.labels(scope)
        for operation in ("pauses", "backoff", "bounces", "suppression"):
            self.state_errors.labels(operation)
        self.hard_bounces = Counter(
            "sendguard_hard_bounces_total",
            "Recipients the upstream refused as dead addresses (5.1.1 and kin)",
            registry=r,
        )
        self.bounce_pauses = Counter(
            "sendguard_bounce_pauses_total",
            "Senders whose commercial mail was paused for their hard-bounce rate",
            registry=r,
        )
        self.complaints = Counter(
            "sendguard_complaints_total",
            "Feedback reports (ARF) received: recorded (the recipient opted out), no_recipient (none could be "
            "found in the report), not_abuse (another feedback type), unreadable, store_error",
            ["outcome"],
            registry=r,
        )
        for outcome in ("recorded", "no_recipient", "not_abuse", "unreadable", "store_error"):
            self.complaints.labels(outcome)
        self.complaint_pauses = Counter(
            "sendguard_complaint_pauses_total",
            "Senders whose commercial mail was paused for their complaint rate",
            registry=r,
        )
        self.bounce_bursts = Counter(
            "sendguard_bounce_bursts_total",
            "Hard bounces of many addresses within seconds: taken for an upstream fault, not dead "
            "addresses (nothing suppressed, commercial mail paused)",
            registry=r,
        )
        self.ratelimit_store_errors = Counter(
            "sendguard_ratelimit_store_errors_total",
            "Rate-limit store failures (reserve: the limit's on_error decided; refund: budget left charged)",
            ["operation"],
            registry=r,
        )
        for operation in ("reserve", "refund"):
            self.ratelimit_store_errors.labels(operation)
        self.blocklist_listed = Gauge(
            "sendguard_blocklist_listed",
            "Configured sending IPs or domains listed",
            ["zone", "target_kind"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.blocklist_unknown = Gauge(
            "sendguard_blocklist_unknown",
            "Configured targets whose listing is unknown (timeout, SERVFAIL, refused)",
            ["zone", "target_kind"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.blocklist_last_check = Gauge(
            "sendguard_blocklist_last_check_timestamp_seconds",
            "End of the last blocklist round",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.commercial_paused_by_blocklist = Gauge(
            "sendguard_blocklist_pausing_commercial",
            "1 while a listing pauses commercial mail",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.dkim_signatures = Counter(
            "sendguard_dkim_signatures_total", "Messages by DKIM signing result", ["result"], registry=r
        )
        for result in ("signed", "no_key", "no_from", "error"):
            self.dkim_signatures.labels(result)
        self.dkim_domain_signatures = Counter(
            "sendguard_dkim_domain_signatures_total",
            "DKIM signatures made, by signing domain (the configured key domains)",
            ["domain"],
            registry=r,
        )
        self.spool_messages = Gauge(
            "sendguard_spool_messages",
            "Messages in the retry queue, by kind (copy, dsn)",
            ["kind"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self.spool_oldest_age = Gauge(
            "sendguard_spool_oldest_age_seconds",
            "Age of the oldest message in the retry queue (0: empty)",
            multiprocess_mode="livemax",
            registry=r,
        )
        self.spool_deliveries = Counter(
            "sendguard_spool_deliveries_total",
            "Delivery attempts from the retry queue by kind and result (delivered, deferred, failed: given up)",
            ["kind", "result"],
            registry=r,
        )
        for kind in SPOOL_KINDS:
            self.spool_messages.labels(kind)
            for result in SPOOL_RESULTS:
                self.spool_deliveries.labels(kind, result)
        for stage in UPSTREAM_STAGES:
            self.upstream_duration.labels(stage)
            for klass in UPSTREAM_CLASSES:
                self.upstream_replies.labels(stage, klass)
        for stage in ("mail", "rcpt", "message"):
            self.policy_duration.labels(stage)
        for state in ("idle", "busy"):
            self.upstream_connections.labels(state)

    def declare_listeners(self, names: Iterable[str]) -> None:
        for listener in names:
            self.sessions_active.labels(listener)
            self.listener_stress.labels(listener)
            for outcome in ("accepted", "refused_limit", "refused_proxy", "command_timeout", "idle_timeout"):
                self.sessions.labels(listener, outcome)
            for result in ("success", "failure", "blocked"):
                self.auth.labels(listener, result)
            for tls in ("tls", "plaintext"):
                self.tls_transactions.labels(listener, tls)
            for klass in CLASSES_OR_UNKNOWN:
                for outcome in MESSAGE_OUTCOMES:
                    self.messages.labels(listener, klass, outcome)
                for outcome in RECIPIENT_OUTCOMES:
                    self.recipients.labels(listener, klass, outcome)

    def declare_backoff_rules(self, rules: Iterable[tuple[str, str]]) -> None:
        for rule, scope in rules:
            self.backoff_matches.labels(rule)
            self.backoff_pauses.labels(rule, scope)

    def declare_policies(self, policies: Iterable[tuple[str, str]]) -> None:
        """``policies``: (policy id, mode) pairs of the running config."""
        for policy, mode in policies:
            self.policy_errors.labels(policy)
            self.policy_latency.labels(policy)
            for action in POLICY_ACTIONS:
                self.policy_verdicts.labels(policy, action, mode)

    def declare_limits(self, names: Iterable[str]) -> None:
        """The rate_limit policies' limit names."""
        for name in names:
            self.ratelimit_refusals.labels(name)

    def declare_dkim_domains(self, domains: Iterable[str]) -> None:
        for domain in domains:
            self.dkim_domain_signatures.labels(domain)

    def blocklists(
        self, gauges: dict[tuple[str, str], tuple[int, int]], pausing: bool, last_check: float | None
    ) -> None:
        """From the blocklist watcher: (zone, target kind) -> (listed, unknown) counts."""
        for key in self._blocklist_keys - gauges.keys():  # a zone no longer watched (0 under workers)
            for gauge in (self.blocklist_listed, self.blocklist_unknown):
                gauge.labels(*key).set(0)
                gauge.remove(*key)
        self._blocklist_keys = set(gauges)
        for (zone, kind), (listed, unknown) in gauges.items():
            self.blocklist_listed.labels(zone, kind).set(listed)
            self.blocklist_unknown.labels(zone, kind).set(unknown)
        self.commercial_paused_by_blocklist.set(1 if pausing else 0)
        if last_check is not None:
            self.blocklist_last_check.set(last_check)

    def set_config(self, digest: str) -> None:
        if self._digest is not None and self._digest != digest:
            self.config_info.labels(self._digest).set(0)  # FORGOTTEN_AT_ZERO
            self.config_info.remove(self._digest)
        self._digest = digest
        self.config_info.labels(digest).set(1)

    # ---- PipelineObserver -------------------------------------------------------------

    def policy_verdict(self, policy: str, action: str, mode: str, duration: float) -> None:
        self.policy_verdicts.labels(policy, action, mode).inc()
        self.policy_latency.labels(policy).observe(duration)

    def policy_error(self, policy: str) -> None:
        self.policy_errors.labels(policy).inc()

    def set_pause_counts(self, pauses: Sequence[Pause]) -> None:
        """Pauses in force by scope; the gauges are touched only when the numbers change."""
        counts = tuple(sum(1 for p in pauses if p.scope == scope) for scope in _PAUSE_SCOPES)
        if counts != self._pause_counts:
            self._pause_counts = counts
            for scope, count in zip(_PAUSE_SCOPES, counts, strict=True):
                self.pauses_active.labels(scope).set(count)
        ends: dict[tuple[str, str], float] = {}
        for pause in pauses:
            key = (pause.scope, pause.source)
            ends[key] = max(ends.get(key, 0.0), pause.until)
        if ends != self._pause_ends:
            # A pause that ended leaves no series behind: an alert on this gauge ends with it.
            for key in self._pause_ends.keys() - ends.keys():
                self.pause_until.labels(*key).set(0)  # FORGOTTEN_AT_ZERO
                self.pause_until.remove(*key)
            for key, until in ends.items():
                self.pause_until.labels(*key).set(until)
            self._pause_ends = ends

    def upstream_pool(self, busy: int, idle: int) -> None:
        self.upstream_connections.labels("busy").set(busy)
        self.upstream_connections.labels("idle").set(idle)

    def ratelimit_store_error(self, operation: str) -> None:
        self.ratelimit_store_errors.labels(operation).inc()

    def ratelimit_refusal(self, limit: str) -> None:
        self.ratelimit_refusals.labels(limit).inc()

    def consent_lookup(self, operation: str, seconds: float, ok: bool) -> None:
        self.consent_lookups.labels(operation, "ok" if ok else "error").inc()
        self.consent_lookup_duration.labels(operation).observe(seconds)

    def upstream_timing(self, stage: str, seconds: float) -> None:
        """From the upstream pool: ``connect`` (a new connection made ready) or ``pool_wait``."""
        if stage == "pool_wait":
            self.upstream_pool_wait.observe(seconds)
        else:
            self.upstream_duration.labels(stage).observe(seconds)

    def spool_state(self, counts: dict[str, int], oldest_age: float) -> None:
        for kind in SPOOL_KINDS:
            self.spool_messages.labels(kind).set(counts.get(kind, 0))
        self.spool_oldest_age.set(oldest_age)

    def upstream_reply(self, stage: str, klass: str) -> None:
        self.upstream_replies.labels(stage, klass).inc()
