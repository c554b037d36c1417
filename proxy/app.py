"""The running application: listeners, the HTTP side, reloads, signals and a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Literal

from aiohttp import web
from prometheus_client import CollectorRegistry

from policies.base import MESSAGE_CLASSES
from proxy import __version__
from proxy.api.erasure import api_eraser, attach_erasers, counter_eraser, spool_eraser
from proxy.api.server import ApiContext, ApiServer
from proxy.api.state import ApiState, open_api_state
from proxy.api.webhooks import Deliverer, Notifier, WebhookMetrics
from proxy.config.settings import ConfigError, ListenerConfig, Settings, load_config
from proxy.observability.http import build_http_app, start_site
from proxy.observability.logsetup import AuditLog
from proxy.observability.memory import tune_allocator
from proxy.observability.metrics import Metrics
from proxy.relay.classify import Classifier
from proxy.relay.drain import Drainer
from proxy.relay.pipeline import Pipeline
from proxy.relay.runtime import Runtime
from proxy.relay.spool import Spool
from proxy.relay.upstream import build_upstream
from proxy.replies import R421_SHUTTING_DOWN
from proxy.reputation.backoff import Backoff
from proxy.reputation.blocklists import BlocklistWatcher
from proxy.reputation.bounces import Bounces
from proxy.reputation.complaints import Complaints
from proxy.reputation.dkim import Signer
from proxy.reputation.resolver import build_resolver
from proxy.smtp.auth import UserStore
from proxy.smtp.commands import RelayHandler
from proxy.smtp.listener import ListenerState, Services
from proxy.smtp.session import SendguardSMTP
from proxy.stores.consent import NO_SOFT_OPT_IN, ConsentStore, SoftOptInRules, open_consent_store
from proxy.stores.limits import open_limit_store
from proxy.stores.pauses import Pause, open_pause_store
from proxy.unsubscribe import UnsubscribeService
from proxy.unsubscribe.tokens import TokenError
from proxy.unsubscribe.web import UnsubscribeServers

__all__ = ("App", "Role", "serve")

#: What a process runs (proxy/supervisor.py): ``single`` everything; with worker processes the
#: ``parent`` everything but the SMTP sessions (HTTP, API, unsubscribe, the background jobs) and
#: each ``worker`` the SMTP sessions on the listening sockets the parent bound.
Role = Literal["single", "parent", "worker"]

log = logging.getLogger("sendguard")

#: Readiness probes: a consent lookup for an address nobody has, each within this time.
_PROBE_ADDRESS = "readiness-probe@sendguard.invalid"
_PROBE_TIMEOUT = 2.0


def _fully_qualified(name: str) -> bool:
    labels = name.rstrip(".").split(".")
    return len(labels) >= 2 and all(labels) and name.lower() not in ("localhost.localdomain",)


def _name_warnings(settings: Settings, hostname: str) -> list[str]:
    """The names sendguard gives that are not fully qualified: each listener's greeting (and
    Received "by"), and the EHLO name it gives the upstream, which Microsoft 365, Google and
    most smarthosts check (RFC 5321 4.1.1.1: the client's fully qualified name)."""
    warnings = []
    for listener in settings.listeners:
        name = listener.hostname or hostname
        if not _fully_qualified(name):
            warnings.append(
                f"listener {listener.name} greets as {name!r}, not a fully qualified domain name (RFC 5321 2.3.5, "
                "4.1.3); set hostname: for the listener to this machine's name in the DNS"
            )
    upstream = settings.upstream
    helo = upstream.helo_name or hostname
    if not upstream.is_maildir and not _fully_qualified(helo):
        warnings.append(
            f"sendguard says EHLO {helo!r} to the upstream, not a fully qualified domain name (RFC 5321 "
            "4.1.1.1); providers refuse or score such mail: set upstream.helo_name to this machine's name in the DNS"
        )
    return warnings


_UPSTREAM_FAILURES = {
    "tls_failed": "TLS failed (certificate or handshake)",
    "auth_failed": "our credentials were refused",
    "timeout": "no answer (timeout)",
    "error": "not reachable",
    "disconnected": "connection lost",
}


class App:
    def __init__(
        self,
        settings: Settings,
        *,
        config_path: str | None = None,
        overrides: Mapping[str, str] | None = None,
        environ: Mapping[str, str] | None = None,
        role: Role = "single",
        sockets: Mapping[str, socket.socket] | None = None,
        metrics_registry: CollectorRegistry | None = None,
        smtp: bool = True,
    ) -> None:
        self.settings = settings
        #: False in milter mode: the MTA owns the SMTP sessions, no SMTP listener is opened.
        self.smtp = smtp
        #: What the serving mode cannot do with a config (milter mode: copies per recipient);
        #: a reload to a config with problems is refused as a bad file is.
        self.mode_problems: Callable[[Settings], list[str]] | None = None
        self.role: Role = role
        #: Listening sockets bound by the parent, by listener name (the parent's and a worker's).
        self.sockets = dict(sockets or {})
        #: What /metrics serves when not the process's own registry (the parent: every worker's).
        self.metrics_registry = metrics_registry
        #: Called after each successful reload with its reason (the parent tells its workers).
        self.on_reload: Callable[[str], None] | None = None
        #: Extra readiness detail and problems (the parent: its workers).
        self.readiness_extra: Callable[[], tuple[dict[str, object], list[str]]] | None = None
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        self.environ = environ
        self.listeners: dict[str, ListenerState] = {}
        self.servers: dict[str, asyncio.AbstractServer] = {}
        self.bound: dict[str, tuple[str, int]] = {}
        self.http_bound: tuple[str, int] | None = None
        self._runtime: Runtime | None = None
        self._services: Services | None = None
        self._http_runner: web.AppRunner | None = None
        self._accepting = False
        #: What /readyz says of the upstream: (working, why not, when learnt).
        self._upstream_health: tuple[bool, str, float] = (True, "", 0.0)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._session_tasks: set[asyncio.Task[None]] = set()
        #: Every config generation still alive: the current one and those finishing transactions.
        self._runtimes: list[Runtime] = []
        self._watch_stamp: tuple[int, int] | None = None
        self._reload_lock = asyncio.Lock()
        self._generation = 0
        self._blocklist_task: asyncio.Task[None] | None = None
        self._blocklist_key: object = None
        #: The retry queue's worker: one per process, whatever the listeners.
        self._drainer_task: asyncio.Task[None] | None = None
        #: One-click unsubscribe (unsubscribe: enabled): lives across reloads, like the metrics.
        self.unsubscribe: UnsubscribeService | None = None
        self.unsubscribe_servers: UnsubscribeServers | None = None
        #: The consent API and the webhooks' outbox (api.address, webhooks.endpoints): per process.
        self.api_state: ApiState | None = None
        self.api_server: ApiServer | None = None
        self.notifier: Notifier | None = None
        self._deliverer: Deliverer | None = None
        self._deliverer_task: asyncio.Task[None] | None = None

    # ---- AppHandle ------------------------------------------------------------------------

    @property
    def runtime(self) -> Runtime:
        assert self._runtime is not None, "App.start() first"
        return self._runtime

    @property
    def services(self) -> Services:
        assert self._services is not None, "App.start() first"
        return self._services

    @property
    def accepting(self) -> bool:
        return self._accepting

    # ---- start ----------------------------------------------------------------------------

    async def _open_consent(self, settings: Settings, previous: Runtime | None) -> ConsentStore | None:
        """The consent store, when a configured policy or bounce suppression needs it; kept across reloads while
        stores.consent is unchanged. connect=False: a PostgreSQL that is down at start must not
        stop transactional mail; commercial mail gets 451 4.3.0 until it is back."""
        if not (
            settings.needs("consent")
            or settings.bounces.suppress
            or settings.unsubscribe.enabled
            or settings.api.address is not None
            or settings.webhooks.endpoints
        ):
            return None
        if (
            previous is not None
            and previous.consent is not None
            and (previous.settings.stores.consent == settings.stores.consent)
        ):
            return previous.consent
        return await open_consent_store(settings.stores.consent, connect=False)

    def _build_runtime(
        self,
        settings: Settings,
        previous: Runtime | None = None,
        consent: ConsentStore | None = None,
        *,
        reread_files: bool = False,
    ) -> Runtime:
        """Everything built from one config, reusing what the previous generation has where
        its config is the same. Whatever it opens is closed again when it fails."""
        opened: list[Any] = []
        try:
            return self._build_runtime_parts(settings, previous, consent, opened, reread_files)
        except BaseException:
            for resource in opened:
                self._spawn(resource.close())
            raise

    def _build_runtime_parts(
        self,
        settings: Settings,
        previous: Runtime | None,
        consent: ConsentStore | None,
        opened: list[Any],
        reread_files: bool,
    ) -> Runtime:
        metrics = self.services.metrics
        upstream = None
        if previous is not None and previous.settings.upstream == settings.upstream:
            upstream = previous.upstream  # keep the pool: same upstream, same connections
        if upstream is None:
            upstream = build_upstream(
                settings.upstream,
                helo_name=self.services.hostname,
                on_reply=self._upstream_reply,
                on_pool=metrics.upstream_pool,
                on_timing=metrics.upstream_timing,
            )
            opened.append(upstream)
        if previous is not None and previous.settings.stores.state == settings.stores.state:
            # Same shared state: keep the connections, and the in-memory budgets and pauses.
            pauses, limits = previous.pauses, previous.limits
        else:
            pauses, limits = open_pause_store(settings.stores.state), open_limit_store(settings.stores.state)
            opened.extend((pauses, limits))
        signer = None
        if previous is not None and previous.settings.dkim == settings.dkim and not reread_files:
            signer = previous.signer  # SIGHUP re-reads the key files even when the config is the same
        if signer is None:
            signer = Signer.from_config(settings.dkim)  # a bad key raises: the reload is refused
        resolver = None
        if previous is not None and previous.settings.dns.resolver == settings.dns.resolver:
            resolver = previous.resolver
        if resolver is None:
            resolver = build_resolver(settings.dns.resolver)
        resources = {
            "dns": resolver,
            "dkim": signer,
            "sending_ips": settings.dns.sending_ips,
            "limits": limits,
            "metrics_limit_errors": metrics.ratelimit_store_error,
            "metrics_limit_refusals": metrics.ratelimit_refusal,
            "metrics_consent_lookup": metrics.consent_lookup,
            "consent": consent,
            "unsubscribe": self.unsubscribe,
            # class -> headers sendguard adds itself (e.g. one-click List-Unsubscribe)
            "headers_added": {c: settings.headers_added(c) for c in MESSAGE_CLASSES},
        }
        pipeline = Pipeline(settings.policies, resources=resources, observer=metrics)
        self._generation += 1
        return Runtime(
            settings=settings,
            pipeline=pipeline,
            classifier=Classifier(settings.classes),
            upstream=upstream,
            pauses=pauses,
            limits=limits,
            backoff=Backoff(settings.backoff, pauses, metrics),
            bounces=Bounces(settings.bounces, consent, pauses, metrics),
            signer=signer,
            resolver=resolver,
            generation=self._generation,
            consent=consent,
            complaints=Complaints(settings.complaints, consent, pauses, metrics),
        )

    def _announce(self, settings: Settings) -> None:
        """Metrics for the config now running (after the swap: a refused reload shows nothing new)."""
        metrics = self.services.metrics
        metrics.declare_listeners(listener.name for listener in settings.listeners)
        metrics.declare_policies((entry.id, entry.mode) for entry in settings.policies)
        metrics.declare_backoff_rules((rule.name, rule.scope) for rule in settings.backoff.rules)
        metrics.declare_limits(
            spec.label for entry in settings.policies if entry.name == "rate_limit" for spec in entry.options.limits
        )
        metrics.declare_dkim_domains(key.domain for key in settings.dkim.keys)
        metrics.set_config(settings.digest)

    async def _complaint_report(self, content: bytes, peer: str) -> str | None:
        """A message to the mailto listener that may be a feedback report: the running
        generation's complaint handling reads it (None: not a report)."""
        runtime, service = self._runtime, self.unsubscribe
        if runtime is None or runtime.complaints is None or service is None:
            return None

        def read_token(text: str) -> tuple[str, str] | None:
            try:
                token = service.read(text, allow_expired=True)
            except TokenError:
                return None
            return token.recipient, token.sender

        return await runtime.complaints.receive(content, peer, read_token)

    @staticmethod
    def _start_warnings(settings: Settings, hostname: str) -> list[str]:
        """Said once at start (by the parent when there are workers)."""
        return [
            *(f"config: {w}" for w in settings.compliance_warnings()),
            *(f"config: {w}" for w in settings.load_warnings),
            *_name_warnings(settings, hostname),
        ]

    def track(self, coro: Coroutine[Any, Any, None]) -> None:
        """A session's clean-up (its last audit line) running after the client left: stop()
        waits for these before it closes the audit log."""
        task = asyncio.get_running_loop().create_task(coro)
        self._session_tasks.add(task)
        task.add_done_callback(self._session_tasks.discard)

    async def start(self) -> None:
        settings = self.settings
        hostname = await asyncio.to_thread(socket.getfqdn)
        self._services = Services(
            metrics=Metrics(__version__),
            audit=AuditLog(
                settings.audit.path, settings.audit.max_size, settings.audit.keep, shared=self.role != "single"
            ),
            users=UserStore(settings.users_file),
            hostname=hostname,
            spool=await asyncio.to_thread(Spool, settings.spool.path),
        )
        if settings.unsubscribe.enabled:
            self.unsubscribe = UnsubscribeService(
                settings.unsubscribe,
                lambda: self._runtime.consent if self._runtime is not None else None,
                audit=self._services.audit,
                registry=self._services.metrics.registry,
                rules=_soft_opt_in_rules(settings),
            )
            self.unsubscribe.complaints = self._complaint_report
            self.unsubscribe.complaints_address = settings.complaints.address
        self._runtime = self._build_runtime(settings, consent=await self._open_consent(settings, None))
        self._runtimes.append(self._runtime)
        await self._open_api(settings)
        self._observe(self._runtime)
        self._announce(settings)
        for warning in [] if self.role == "worker" else self._start_warnings(settings, hostname):
            log.warning("%s", warning)
        loop = asyncio.get_running_loop()
        background = self.role != "worker"  # HTTP, API, unsubscribe pages, jobs: once, not per worker
        try:
            for config in settings.listeners if self.smtp else ():
                if self.role == "parent":
                    sockname = self.sockets[config.name].getsockname()
                    self.listeners[config.name] = ListenerState(config)
                    self.bound[config.name] = (sockname[0], sockname[1])
                else:
                    await self._start_listener(loop, config)
            if background and settings.http.address is not None:
                await self._start_http(settings)
            if background and self.unsubscribe is not None:
                self.unsubscribe_servers = UnsubscribeServers(self.unsubscribe)
                await self.unsubscribe_servers.start()
            if self.api_server is not None:
                await self.api_server.start()
        except BaseException:
            await self.stop()
            raise
        self._accepting = True
        if not background:
            self.services.metrics.config_last_reload_time.set_to_current_time()
            return
        self._log_inventory(settings)
        if self.config_path and settings.reload.watch:
            self._watch_stamp = self._stamp()
            self._spawn(self._watch_config())
        self._start_blocklist_watch(settings)
        self._start_drainer()
        self.services.metrics.config_last_reload_time.set_to_current_time()

    async def _open_api(self, settings: Settings) -> None:
        """The API's tables (idempotency keys, the webhook outbox) in the consent database, the
        notifier that fills the outbox, the API site and the deliverer. Their addresses and the
        database are read at start; tokens, rates and endpoints follow reloads."""
        if settings.api.address is None and not settings.webhooks.endpoints:
            return
        self.api_state = await open_api_state(settings.stores.consent)
        metrics = WebhookMetrics.for_registry(self.services.metrics.registry)
        self.notifier = Notifier(
            self.api_state, lambda: self.runtime.settings.webhooks, metrics, consent=lambda: self.runtime.consent
        )
        self._observe(self.runtime)
        if self.role == "worker":
            # The worker's notifier fills the shared outbox; the parent's deliverer empties it
            # (and its sweep finds what a worker recorded, as after a crash).
            return
        if settings.api.address is not None:
            context = ApiContext(
                config=lambda: self.runtime.settings.api,
                consent=lambda: self.runtime.consent,
                limits=lambda: self.runtime.limits,
                rules=lambda: _soft_opt_in_rules(self.runtime.settings),
                state=self.api_state,
                audit=self.services.audit,
            )
            self.api_server = ApiServer(context)
        self._deliverer = Deliverer(
            self.api_state, lambda: self.runtime.settings.webhooks, metrics, sweep=self.notifier.sweep
        )
        self.notifier.on_queued = self._deliverer.wake
        self._deliverer_task = asyncio.get_running_loop().create_task(self._deliverer.run())
        self._spawn(self._api_housekeeping(self.api_state))

    async def _api_housekeeping(self, state: ApiState) -> None:
        """Forget idempotency keys older than api.idempotency_ttl (and delivered webhooks a day
        after that), hourly: the tables stay the size of a day's traffic."""
        while True:
            try:
                await state.purge_keys(time.time() - float(self.runtime.settings.api.idempotency_ttl))
            except Exception as exc:
                log.warning("api housekeeping failed: %s", exc)
            await asyncio.sleep(3600)

    def _observe(self, runtime: Runtime) -> None:
        """Let the audit log and the notifier hear of the opt-outs, suppressions and pauses this
        generation's stores record (each store once, however many generations share it), and
        let an erasure reach the other places the address may be (``api/erasure.py``)."""
        if self._audit_pause not in runtime.pauses.observers:
            runtime.pauses.observers.append(self._audit_pause)
        if runtime.consent is not None:
            erasers = [spool_eraser(self.services.spool)] if self.services.spool is not None else []
            erasers.append(counter_eraser(runtime.pauses))
            if self.api_state is not None:
                erasers.append(api_eraser(self.api_state))
            attach_erasers(runtime.consent, erasers)
        notifier = self.notifier
        if notifier is None:
            return
        if runtime.consent is not None and notifier.consent_events not in runtime.consent.observers:
            runtime.consent.observers.append(notifier.consent_events)
        if notifier.pause not in runtime.pauses.observers:
            runtime.pauses.observers.append(notifier.pause)

    async def _audit_pause(self, pause: Pause) -> None:
        """A pause on record as it is set, so that the report shows it even when it held no
        message (a transaction it held names it too)."""
        self.services.audit.write(
            {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "event": "pause",
                "scope": pause.scope,
                "value": pause.value,
                "class": pause.message_class if pause.scope != "class" else pause.value,
                "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(pause.until)),
                "reason": pause.reason,
                "source": pause.source,
            }
        )

    def _start_drainer(self) -> None:
        spool = self.services.spool
        assert spool is not None
        drainer = Drainer(spool, lambda: self.runtime, self.services.metrics, self.services.hostname)
        self._drainer_task = asyncio.get_running_loop().create_task(drainer.run())

    async def _start_listener(self, loop: asyncio.AbstractEventLoop, config: ListenerConfig) -> None:
        state = ListenerState(config)
        self.listeners[config.name] = state

        def factory() -> SendguardSMTP:
            handler = RelayHandler(self, state)
            timeouts = self.runtime.settings.timeouts
            return SendguardSMTP(
                handler,
                state,
                self.services,
                timeouts.idle,
                timeouts.session,
                command_timeout=timeouts.command,
                stress_idle=timeouts.stress_idle,
            )

        ssl_context = state.tls_context if config.tls.mode == "implicit" else None
        # asyncio's default backlog (100) leaves a burst of connections accepted by the kernel
        # but never by the process: no greeting and no 421 for seconds.
        backlog = listen_backlog(config)
        inherited = self.sockets.get(config.name)
        try:
            if inherited is not None:  # a worker: the socket the parent bound (proxy/supervisor.py)
                server = await loop.create_server(factory, sock=inherited, ssl=ssl_context, backlog=backlog)
            else:
                server = await loop.create_server(
                    factory,
                    host=config.address.host,
                    port=config.address.port,
                    ssl=ssl_context,
                    reuse_address=True,
                    backlog=backlog,
                )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen on {config.address} for listener {config.name!r}: {exc.strerror}"
            ) from exc
        self.servers[config.name] = server
        sockname = server.sockets[0].getsockname()
        self.bound[config.name] = (sockname[0], sockname[1])

    async def _start_http(self, settings: Settings) -> None:
        address = settings.http.address
        assert address is not None
        self._http_runner, self.http_bound = await start_site(
            build_http_app(self.services.metrics, self, registry=self.metrics_registry), address, "HTTP"
        )

    def _log_inventory(self, settings: Settings) -> None:
        for name, (host, port) in self.bound.items():
            config = settings.listener(name)
            log.info(
                "listener %s on %s:%s (tls=%s, auth=%s, trusted=%s)",
                name,
                host,
                port,
                config.tls.mode,
                config.auth,
                ",".join(str(n) for n in config.trusted_networks),
            )
        log.info("upstream %s", settings.upstream.address)
        for entry in settings.policies:
            log.info(
                "policy %s (%s) mode=%s on_error=%s classes=%s",
                entry.id,
                entry.name,
                entry.mode,
                entry.on_error,
                ",".join(entry.classes),
            )
        if self.http_bound:
            log.info("http on %s:%s (/metrics /healthz /readyz)", *self.http_bound)

    def _upstream_reply(self, stage: str, outcome: str) -> None:
        """Every upstream answer counts in the metrics; connection attempts also set what
        /readyz says of the upstream (a reply at any stage proves it reachable)."""
        self.services.metrics.upstream_reply(stage, outcome)
        if stage == "connect" or outcome in ("2xx", "4xx", "5xx"):
            ok = outcome in ("2xx", "4xx", "5xx")
            self.services.metrics.upstream_up.set(1 if ok else 0)
            self._upstream_health = (ok, "" if ok else _UPSTREAM_FAILURES.get(outcome, outcome), time.time())

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready: listening and accepting, the upstream's last connection attempt worked, the
        consent store answers (commercial mail fails closed without it). The shared state
        store (Redis) failing is ``degraded``, not unready: limits and pauses fail open."""
        listening = {name: f"{h}:{p}" for name, (h, p) in self.bound.items()}
        runtime = self._runtime
        detail: dict[str, object] = {"listeners": listening, "accepting": self._accepting}
        problems: list[str] = []
        degraded: list[str] = []
        if runtime is not None:
            detail["config"] = runtime.settings.digest
            detail["upstream"] = runtime.settings.upstream.address
            ok, reason, when = self._upstream_health
            if not ok:
                problems.append(f"upstream: {reason} (last try {time.strftime('%H:%M:%S', time.gmtime(when))} UTC)")
            if runtime.consent is not None:
                try:
                    await asyncio.wait_for(runtime.consent.history(_PROBE_ADDRESS), _PROBE_TIMEOUT)
                except Exception as exc:
                    problems.append(f"consent store: {type(exc).__name__}: {str(exc)[:200]}")
            if runtime.settings.stores.state.backend != "memory":
                try:
                    await asyncio.wait_for(runtime.pauses.count("readiness-probe", 1), _PROBE_TIMEOUT)
                except Exception as exc:
                    degraded.append(f"state store: {type(exc).__name__}; rate limits and pauses fail open")
        if self.readiness_extra is not None:
            extra, extra_problems = self.readiness_extra()
            detail.update(extra)
            problems.extend(extra_problems)
        if problems:
            detail["problems"] = problems
        if degraded:
            detail["degraded"] = degraded
        return self._accepting and bool(listening) and not problems, detail

    # ---- blocklist watch ------------------------------------------------------------------

    def _start_blocklist_watch(self, settings: Settings) -> None:
        """(Re)start the watch when what it watches changed; nothing to watch, no task."""
        key = (settings.dns, tuple(k.domain for k in settings.dkim.keys))
        if key == self._blocklist_key and self._blocklist_task is not None:
            return
        if self._blocklist_task is not None:
            self._blocklist_task.cancel()
            self._blocklist_task = None
        self._blocklist_key = key
        watcher = BlocklistWatcher.from_config(
            settings.dns, self.runtime.resolver, dkim_domains=[k.domain for k in settings.dkim.keys]
        )
        if not settings.dns.blocklists.enabled or not (watcher.ips or watcher.domains):
            return
        self._blocklist_task = asyncio.get_running_loop().create_task(self._blocklist_rounds(watcher))

    async def _blocklist_rounds(self, watcher: BlocklistWatcher) -> None:
        """Each round: check, export metrics, and keep commercial mail paused (through the
        shared pause store, so every instance holds) for as long as a listing says so."""
        metrics = self.services.metrics
        paused = False
        while True:
            try:
                await watcher.check_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("blocklist round failed")
            reason = watcher.pause_reason()
            metrics.blocklists(watcher.gauges(), reason is not None, watcher.last_check)
            pauses = self.runtime.pauses
            try:
                if reason is not None:
                    # Renewed every round; outlives one missed round, ends by itself if we stop.
                    until = time.time() + 2 * watcher.config.interval + 60
                    await pauses.pause(
                        Pause(
                            "class",
                            "commercial",
                            until,
                            "a sending IP or domain of this server is on a DNS blocklist",
                            "blocklist",
                        )
                    )
                    if not paused:
                        log.warning("commercial mail paused: %s", reason)
                    paused = True
                elif paused:
                    await pauses.lift("class", "commercial", "blocklist")
                    log.info("commercial mail resumed: no pausing blocklist lists us any more")
                    paused = False
            except Exception:
                metrics.state_errors.labels("pauses").inc()
                log.exception("cannot update the blocklist pause in the state store")
            await asyncio.sleep(watcher.config.interval)

    # ---- reload ---------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stamp(self) -> tuple[int, int] | None:
        if not self.config_path:
            return None
        try:
            stat = os.stat(self.config_path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    async def _watch_config(self) -> None:
        while self._accepting or self._runtime is None:
            await asyncio.sleep(self.runtime.settings.reload.interval)
            stamp = self._stamp()
            if stamp is not None and stamp != self._watch_stamp:
                self._watch_stamp = stamp
                await self.reload(reason="file changed")

    async def reload(self, reason: str = "SIGHUP") -> bool:
        """Load the config again and swap it in atomically; a bad file changes nothing."""
        if not self.config_path:
            log.warning("reload requested but sendguard was not started from a file")
            return False
        metrics = self.services.metrics
        async with self._reload_lock:
            try:
                settings = await asyncio.to_thread(
                    load_config, self.config_path, environ=self.environ, overrides=self.overrides
                )
            except ConfigError as exc:
                metrics.config_reloads.labels("failure").inc()
                metrics.config_last_reload_success.set(0)
                log.error(
                    "config reload (%s) refused, keeping the running config: %d problem(s)",
                    reason,
                    len(exc.issues),
                    extra={"fields": {"problems": [str(i) for i in exc.issues]}},
                )
                return False
            problems = self.mode_problems(settings) if self.mode_problems is not None else []
            if problems:
                metrics.config_reloads.labels("failure").inc()
                metrics.config_last_reload_success.set(0)
                log.error(
                    "config reload (%s) refused, keeping the running config: %d problem(s)",
                    reason,
                    len(problems),
                    extra={"fields": {"problems": problems}},
                )
                return False
            old = self.runtime
            unchanged = settings.digest == old.settings.digest
            if unchanged and reason != "SIGHUP":
                log.info("config reload (%s): file unchanged", reason)
                metrics.config_last_reload_success.set(1)
                return True
            consent: ConsentStore | None = None
            try:
                # TLS files first: a bad certificate/key pair refuses the reload before any change.
                for config in settings.listeners:
                    if config.name in self.listeners:
                        ListenerState.check_tls(config)
                consent = await self._open_consent(settings, old)
                # An explicit SIGHUP with the same file re-reads the files it names (a renewed
                # certificate, a replaced DKIM key).
                runtime = self._build_runtime(settings, previous=old, consent=consent, reread_files=unchanged)
            except Exception:
                if consent is not None and consent is not old.consent:
                    await consent.close()
                metrics.config_reloads.labels("failure").inc()
                metrics.config_last_reload_success.set(0)
                log.exception("config reload (%s) failed while building; keeping the running config", reason)
                return False
            self._apply_listener_changes(settings)
            self._apply_unsubscribe_changes(settings)
            if settings.spool.path != old.settings.spool.path:
                log.warning("spool.path changed; the retry queue moves at the next restart")
            self._runtime = runtime
            self._runtimes.append(runtime)
            self._observe(runtime)
            self.settings = settings
            self._announce(settings)
            self._spawn(self._retire(old))
            for warning in settings.load_warnings:
                log.warning("config: %s", warning)
            metrics.config_reloads.labels("success").inc()
            metrics.config_last_reload_success.set(1)
            metrics.config_last_reload_time.set_to_current_time()
            self._start_blocklist_watch(settings)
            log.info("config reloaded (%s): %s", reason, settings.digest)
            if self.on_reload is not None:
                self.on_reload(reason)
            for warning in _name_warnings(settings, self.services.hostname):
                log.warning("%s", warning)
            self._log_inventory(settings)
            return True

    def _apply_listener_changes(self, settings: Settings) -> None:
        for config in settings.listeners:
            state = self.listeners.get(config.name)
            if state is None:
                log.warning("new listener %s needs a restart to start listening", config.name)
                continue
            old = state.config
            if (old.address, old.tls.mode) != (config.address, config.tls.mode):
                log.warning(
                    "listener %s: address or TLS mode changes need a restart; other settings applied", config.name
                )
                config = dataclasses.replace(
                    config, address=old.address, tls=dataclasses.replace(config.tls, mode=old.tls.mode)
                )
            state.update(config)
        for name in self.listeners:
            if name not in {c.name for c in settings.listeners}:
                log.warning("listener %s was removed from the config; it stops at the next restart", name)

    def _apply_unsubscribe_changes(self, settings: Settings) -> None:
        """New keys, texts and limits apply at once; switching it on or off, or moving its
        listeners, needs a restart."""
        service = self.unsubscribe
        if service is None:
            if settings.unsubscribe.enabled:
                log.warning("unsubscribe was enabled in the config; it starts at the next restart")
            return
        if not settings.unsubscribe.enabled:
            log.warning("unsubscribe was disabled in the config; the pages stop at the next restart")
            return
        old, new = service.config, settings.unsubscribe
        if (old.listen, old.mailto, old.base_path, old.tls_cert, old.tls_key) != (
            new.listen,
            new.mailto,
            new.base_path,
            new.tls_cert,
            new.tls_key,
        ):
            log.warning("unsubscribe: listen addresses, the base_url path and TLS files change at the next restart")
        service.update(new, _soft_opt_in_rules(settings))

    async def _retire(self, old: Runtime) -> None:
        """When the old generation has no transaction left, close what no live one still uses
        (an older generation may share a store with it and still be finishing)."""
        await old.wait_idle()
        if old in self._runtimes:
            self._runtimes.remove(old)
        await self._close_unused(old.resources())

    async def _close_unused(self, resources: list[Any]) -> None:
        in_use = {id(r) for runtime in self._runtimes for r in runtime.resources()}
        for resource in resources:
            if id(resource) not in in_use:
                try:
                    await resource.close()
                except Exception:
                    log.exception("closing %s failed", type(resource).__name__)

    # ---- stop -----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Stop listening, let transactions in flight finish (up to the shutdown timeout, in
        every config generation), then say 421 to whoever is left and close."""
        self._accepting = False
        for server in self.servers.values():
            server.close()
        if self._runtimes:
            timeout = self._runtimes[-1].settings.timeouts.shutdown
            try:
                await asyncio.wait_for(asyncio.gather(*(r.wait_idle() for r in self._runtimes)), timeout)
            except TimeoutError:
                left = sum(r.in_flight for r in self._runtimes)
                log.warning("%d transaction(s) still in flight after the shutdown timeout", left)
        for state in self.listeners.values():
            for session in list(state.sessions):
                if isinstance(session, SendguardSMTP):
                    session.close_with(R421_SHUTTING_DOWN)
        for server in self.servers.values():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        if self._session_tasks:  # the last audit lines of sessions that just ended
            await asyncio.wait(list(self._session_tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        if self._blocklist_task is not None:
            self._blocklist_task.cancel()
        if self._drainer_task is not None:  # before the upstream it sends through is closed
            self._drainer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer_task
            self._drainer_task = None
        if self._http_runner is not None:
            await self._http_runner.cleanup()
            self._http_runner = None
        if self.unsubscribe_servers is not None:
            await self.unsubscribe_servers.stop()
            self.unsubscribe_servers = None
        if self.api_server is not None:
            await self.api_server.stop()
            self.api_server = None
        if self._deliverer_task is not None:
            self._deliverer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._deliverer_task
            self._deliverer_task = None
        if self.api_state is not None:
            await self.api_state.close()
            self.api_state = None
        resources = {id(r): r for runtime in self._runtimes for r in runtime.resources()}
        self._runtimes.clear()
        await self._close_unused(list(resources.values()))
        if self._services is not None:
            self._services.audit.close()


def listen_backlog(config: ListenerConfig) -> int:
    return max(512, config.max_sessions)


def _soft_opt_in_rules(settings: Settings) -> SoftOptInRules:
    """The soft opt-in scope of the configured consent check, so the recipient's page judges
    as the proxy does (found by its option, not by the policy's name)."""
    for entry in settings.policies:
        soft_opt_in = getattr(entry.options, "soft_opt_in", None)
        if soft_opt_in is not None:
            rules: SoftOptInRules = soft_opt_in.rules()
            return rules
    return NO_SOFT_OPT_IN


async def serve(config_path: str, overrides: Mapping[str, str]) -> int:
    """``sendguard serve``: run until SIGTERM or SIGINT; SIGHUP reloads."""
    tune_allocator()  # big messages' memory goes back to the system (observability/memory.py)
    settings = load_config(config_path, overrides=overrides)
    app = App(settings, config_path=config_path, overrides=overrides)
    await app.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: app._spawn(app.reload("SIGHUP")))
    log.info("sendguard %s ready (event loop %s)", __version__, type(loop).__module__.split(".")[0])
    await stop.wait()
    log.info("stopping: draining transactions in flight")
    await app.stop()
    log.info("stopped")
    return 0


async def serve_milter(config_path: str, overrides: Mapping[str, str], listen: str) -> int:
    """``sendguard milter``: the policies behind the MTA's milter interface until SIGTERM or
    SIGINT; SIGHUP reloads. No SMTP listener: the MTA owns the sessions and the queue."""
    from proxy.milter.server import MilterServer

    tune_allocator()
    settings = load_config(config_path, overrides=overrides)
    from proxy.milter.session import milter_config_errors

    app = App(settings, config_path=config_path, overrides=overrides, smtp=False)
    app.mode_problems = milter_config_errors  # a reload may not bring what a milter cannot do
    await app.start()
    loop = asyncio.get_running_loop()
    largest = max((listener.max_message_size for listener in settings.listeners), default=25 * 1024 * 1024)
    server = MilterServer(app, loop, listen, max_message_size=int(largest))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: app._spawn(app.reload("SIGHUP")))
    runner = loop.run_in_executor(None, server.run)
    runner.add_done_callback(lambda _: stop.set())
    log.info("sendguard %s milter ready on %s", __version__, listen)
    await stop.wait()
    log.info("stopping: draining transactions in flight")
    server.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(runner, settings.timeouts.shutdown)
    await app.stop()
    log.info("stopped")
    return 0 if not runner.done() or runner.exception() is None else 1
