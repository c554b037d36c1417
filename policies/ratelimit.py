"""rate_limit: per-user, per-sender, per-domain and global sending limits, several windows at once.

Why: upstreams enforce their own caps and punish overruns hard (Microsoft 365: 10,000
recipients a day and 30 messages a minute per mailbox, then the mailbox is blocked for the
day; Google's SMTP relay: 10,000 per user per day). sendguard defers the excess with a
``451 4.7.1`` that says when to retry, before the upstream sees it.

    - name: rate_limit
      limits:
        - key: auth_user                    # one budget per AUTH user
          rates: [30/min, 10000/day]        # both windows must have room
          overrides: {bulk-app: [300/min, 100000/day], monitoring: []}   # [] = unlimited
        - key: recipient_domain
          mx_rollup: true                   # one budget per receiving mail server (Gmail: per MX)
          rates: [500/h]
        - key: global
          rates: [100/s]
          count: messages

Semantics, in order of the questions operators ask:

* **What is counted.** ``count: recipients`` (the default) charges one unit per recipient,
  however large the message (rspamd's ``max_rcpt`` skips big messages; this never does);
  ``count: messages`` one unit per message (per receiving domain or MX for
  ``recipient_domain``).
* **Keys.** ``auth_user``, ``mail_from`` (envelope sender), ``from_domain`` (the From:
  header's domain, known only after DATA), ``client_ip``, ``listener``,
  ``recipient_domain`` and ``global``. A limit whose key has no value in a transaction
  (no AUTH user, no From: header) does not apply to it. Values compare case-insensitively.
* **Rates and burst.** Each rate is a GCRA bucket (see ``proxy.stores.limits``): ``N/period``
  refills N units per period and holds ``burst`` units, by default N (KumoMTA's default
  too), so a full bucket lets one period's worth through at once. The price of that burst:
  within one period up to ``N + burst`` units can pass (a full bucket, then the refill).
  Where an upstream's cap must never be crossed, make the two add up to the cap. Microsoft
  365 (30 messages a minute, 10,000 recipients a day per mailbox)::

        - {key: auth_user, name: m365_messages, count: messages, rates: ["20/min burst 10"]}
        - {key: auth_user, name: m365_recipients, rates: ["9000/day burst 1000"]}
* **When.** Recipient-counted limits are charged at RCPT, one recipient at a time, so the
  client learns which recipients to retry; message-counted limits at MAIL FROM; From-domain
  limits after DATA. Every window of every limit that applies is taken in one atomic store
  call, all or none. Nothing is charged for what is not delivered: ``commit`` refunds the
  recipients the upstream refused and everything of a message that was rejected,
  deferred or abandoned. Refunds are exact (the units taken) and idempotent.
* **Over the limit.** ``451 4.7.1 Rate limit reached for user alice (30/min); try again in
  12s``. With ``hold: 5s`` a limit first holds the reply up to 5 seconds when the budget
  comes back within that time (keep it below the policy's ``timeout``). A message whose
  From-domain limit counts recipients and has more recipients than the bucket's burst can
  never pass; it gets ``550 5.5.3`` asking for smaller batches instead of endless retries.
* **Store trouble.** When the store cannot be reached, ``on_error: accept`` (the default)
  lets the mail pass uncounted, ``tempfail`` answers ``451 4.3.0``; either way the error is
  counted (``store_errors`` and the ``metrics_limit_errors`` resource).
* **Sharing.** Buckets are named by the limit's ``name`` (default: its key): two
  rate_limit entries whose limits have the same name share one budget.

Resources: ``limits`` (a ``LimitStore``; without it the policy keeps a private in-memory
store), ``dns`` (a dnspython async resolver for ``mx_rollup``), ``metrics_limit_errors``
(a callable taking "reserve" or "refund", called once per store error),
``metrics_limit_refusals`` (a callable taking the limit's name, called once per refusal).

Why one module of about 700 lines: 60 of them are this manual, and the rest is one policy
whose ledger (what was reserved at MAIL, RCPT and after DATA, and what ``commit`` refunds)
has to be read in one piece to see that every unit taken is given back exactly once. The
buckets themselves (GCRA, the stores) are in proxy/stores/limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import dns.asyncresolver
import dns.exception
import dns.rdtypes.ANY.MX
import dns.resolver

from policies.base import Outcome, Policy, Transaction, Verdict
from proxy.schema import Duration, doc, parse_rate
from proxy.stores.limits import (
    NEVER,
    Charge,
    LimitStore,
    LimitStoreError,
    MemoryLimitStore,
    Reservation,
    bucket_key,
)

__all__ = ("KEY_KINDS", "LimitSpec", "MXRollup", "RateLimitPolicy", "RateSpec", "parse_rate_spec")

log = logging.getLogger("sendguard.policy.rate_limit")

KeyKind = Literal["auth_user", "mail_from", "from_domain", "client_ip", "listener", "recipient_domain", "global"]
KEY_KINDS: tuple[str, ...] = (
    "auth_user", "mail_from", "from_domain", "client_ip", "listener", "recipient_domain", "global",
)  # fmt: skip
#: Keys known from the envelope at MAIL FROM.
ENVELOPE_KEYS = frozenset({"auth_user", "mail_from", "client_ip", "listener", "global"})
#: How each key is named in a reply; the value is the client's own (user, sender, address).
_WHO = {
    "auth_user": "user {value}",
    "mail_from": "sender {value}",
    "from_domain": "From domain {value}",
    "client_ip": "client {value}",
    "listener": "listener {value}",
    "recipient_domain": "recipient domain {value}",
    "global": "this server",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_BURST_RE = re.compile(r"^(?P<rate>.*?)(?:\s+burst\s+(?P<burst>\d[\d_]*))?\s*$", re.IGNORECASE)


# ---- rates ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateSpec:
    """``count`` per ``period`` seconds holding at most ``burst``; ``text`` as configured."""

    count: int
    period: float
    burst: int
    text: str

    @property
    def interval(self) -> float:
        return self.period / self.count

    def __str__(self) -> str:
        return self.text


def parse_rate_spec(text: str) -> RateSpec:
    """``30/min``, ``10000/day``, ``5/10m``, optionally followed by ``burst N``."""
    match = _BURST_RE.match(text.strip())
    assert match is not None  # the pattern matches any string
    rate = parse_rate(match.group("rate"))
    if rate.count < 1:
        raise ValueError(f"a rate needs a count of at least 1, not {text.strip()!r}")
    burst = int(match.group("burst").replace("_", "")) if match.group("burst") else rate.count
    if burst < 1:
        raise ValueError(f"burst must be at least 1 in {text.strip()!r}")
    return RateSpec(rate.count, rate.period, burst, " ".join(text.split()))


def _parse_rates(texts: Sequence[str], where: str) -> tuple[RateSpec, ...]:
    rates: list[RateSpec] = []
    for i, text in enumerate(texts):
        try:
            rates.append(parse_rate_spec(text))
        except ValueError as exc:
            raise ValueError(f"{where}[{i}]: {exc}") from None
    periods = [r.period for r in rates]
    if len(set(periods)) != len(periods):
        raise ValueError(f"{where}: two rates with the same period; keep the stricter one")
    return tuple(rates)


# ---- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitSpec:
    """One limit: what it is keyed by, its windows, and how it behaves."""

    key: KeyKind = doc(
        "what gets its own budget: auth_user, mail_from, from_domain, client_ip, listener, recipient_domain, global"
    )
    rates: tuple[str, ...] = doc("windows enforced together, e.g. [30/min, 10000/day]; add 'burst N' to cap bursts")
    name: str | None = doc("name in replies, logs and store keys; limits with one name share a budget", default=None)
    count: Literal["recipients", "messages"] = doc("charge per recipient or per message", default="recipients")
    mx_rollup: bool = doc("recipient_domain only: one budget per receiving mail server (MX host)", default=False)
    hold: Duration = doc("over the limit, wait up to this long for room before answering 451", default=Duration(0))
    on_error: Literal["accept", "tempfail"] = doc(
        "when the limit store is unreachable: accept (uncounted) or tempfail (451 4.3.0)", default="accept"
    )
    overrides: dict[str, tuple[str, ...]] = doc(
        "rates for particular key values instead of rates, e.g. {bulk-app: [300/min]}; [] means unlimited",
        default_factory=dict,
    )
    parsed_rates: tuple[RateSpec, ...] = field(init=False, repr=False, compare=False)
    parsed_overrides: dict[str, tuple[RateSpec, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.key not in KEY_KINDS:
            raise ValueError(f"key must be one of {', '.join(KEY_KINDS)}, not {self.key!r}")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise ValueError(f"name {self.name!r}: use letters, digits, '_', '.', '-' (at most 64)")
        if not self.rates:
            raise ValueError("rates: give at least one rate, e.g. [30/min]")
        if self.mx_rollup and self.key != "recipient_domain":
            raise ValueError("mx_rollup applies to key: recipient_domain only")
        if not 0 <= self.hold <= 60:
            raise ValueError("hold must be between 0s and 60s (clients wait at most minutes for a reply)")
        object.__setattr__(self, "parsed_rates", _parse_rates(self.rates, "rates"))
        overrides: dict[str, tuple[RateSpec, ...]] = {}
        for value, texts in self.overrides.items():
            overrides[normalize_value(self.key, value)] = _parse_rates(texts, f"overrides.{value}")
        object.__setattr__(self, "parsed_overrides", overrides)

    @property
    def label(self) -> str:
        return self.name or self.key

    def rates_for(self, value: str) -> tuple[RateSpec, ...]:
        return self.parsed_overrides.get(value, self.parsed_rates)


def normalize_value(kind: str, value: str) -> str:
    """The key value as buckets are named: case-folded; domains as A-labels without the root dot."""
    value = value.strip()
    if kind in ("from_domain", "recipient_domain"):
        return normalize_domain(value)
    return value.lower()


def normalize_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    if not domain.isascii() and not domain.startswith("["):
        # One spelling per domain: U-labels become A-labels (Python's codec is IDNA 2003,
        # RFC 3490); a name it cannot convert stays as written.
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
    return domain


def _domain_of(address: str) -> str | None:
    if "@" not in address:
        return None
    domain = address.rsplit("@", 1)[1]
    return normalize_domain(domain) or None


# ---- MX rollup --------------------------------------------------------------------------------


class MXRollup:
    """Recipient domain -> the mail servers that receive its mail, cached for the answer's TTL.

    The site of a domain is its most preferred MX host names (lowest preference value,
    sorted, joined by ','): every Google-hosted domain answers ``aspmx.l.google.com``, so
    all of them share one budget, as Gmail counts them. A domain without MX records
    receives at its own address (RFC 5321 section 5.1), a null MX (RFC 7505) nowhere: both
    count as the domain itself, and so does a failed lookup (briefly cached), so DNS trouble
    never blocks mail.
    """

    def __init__(
        self,
        resolver: dns.asyncresolver.Resolver | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10_000,
        negative_ttl: float = 300.0,
        error_ttl: float = 30.0,
        max_ttl: float = 86400.0,
        lookup_timeout: float = 3.0,
    ) -> None:
        self._resolver = resolver
        self.clock = clock
        self.max_entries = max_entries
        self.negative_ttl = negative_ttl
        self.error_ttl = error_ttl
        self.max_ttl = max_ttl
        self.lookup_timeout = lookup_timeout
        self._cache: dict[str, tuple[str, float]] = {}  # domain -> (site, expires at)
        self._pending: dict[str, asyncio.Future[str]] = {}  # lookups in flight
        self.lookups = 0

    async def site(self, domain: str) -> str:
        cached = self._cache.get(domain)
        if cached is not None and cached[1] > self.clock():
            return cached[0]
        task = self._pending.get(domain)
        if task is None:
            # One lookup per domain at a time, however many recipients wait for it. It runs
            # as its own task, so a waiter that gives up (a policy timeout) cannot cancel it
            # for the others, and its answer still lands in the cache.
            task = asyncio.ensure_future(self._lookup_and_remember(domain))
            self._pending[domain] = task
            task.add_done_callback(lambda done: self._lookup_done(domain, done))
        return await asyncio.shield(task)

    async def _lookup_and_remember(self, domain: str) -> str:
        site, ttl = await self._lookup(domain)
        self._remember(domain, site, ttl)
        return site

    def _lookup_done(self, domain: str, task: asyncio.Future[str]) -> None:
        self._pending.pop(domain, None)
        if not task.cancelled():
            task.exception()  # mark it retrieved: the waiters got it, if any are left

    def _remember(self, domain: str, site: str, ttl: float) -> None:
        ttl = min(max(ttl, 0.0), self.max_ttl)
        if ttl <= 0:
            self._cache.pop(domain, None)
            return
        if domain not in self._cache and len(self._cache) >= self.max_entries:
            self._cache.pop(next(iter(self._cache)))  # the oldest entry
        self._cache[domain] = (site, self.clock() + ttl)

    async def _resolver_instance(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            # Reading /etc/resolv.conf is file I/O: keep it off the event loop.
            self._resolver = await asyncio.to_thread(dns.asyncresolver.Resolver)
        return self._resolver

    async def _lookup(self, domain: str) -> tuple[str, float]:
        if domain.startswith("["):  # an address literal has no MX
            return domain, self.max_ttl
        self.lookups += 1
        resolver = await self._resolver_instance()
        try:
            answer = await resolver.resolve(domain, "MX", lifetime=self.lookup_timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return domain, self.negative_ttl
        except dns.exception.DNSException as error:
            log.info("MX lookup for %s failed (%s); counting the domain itself", domain, type(error).__name__)
            return domain, self.error_ttl
        records = [r for r in answer if isinstance(r, dns.rdtypes.ANY.MX.MX)]
        if not records or all(r.exchange.to_text() == "." for r in records):
            return domain, float(answer.rrset.ttl if answer.rrset is not None else self.negative_ttl)
        best = min(r.preference for r in records)
        hosts = sorted({r.exchange.to_text().rstrip(".").lower() for r in records if r.preference == best})
        ttl = float(answer.rrset.ttl) if answer.rrset is not None else self.negative_ttl
        return ",".join(hosts), ttl


# ---- the policy -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Planned:
    """One bucket to charge and what to say if it is the one over the limit."""

    spec: LimitSpec
    value: str
    rate: RateSpec
    charge: Charge
    who: str


@dataclass(slots=True)
class _Entry:
    """A piece of a reservation and the recipients it stands for.

    ``recipients is None``: the message itself, refunded unless it was delivered.
    ``per_recipient``: each charge took one unit per recipient in ``recipients``; the
    undelivered ones are refunded. Otherwise one charge for the group (the recipients of
    one domain), refunded when none of them was delivered.
    """

    reservation: Reservation
    recipients: set[str] | None
    per_recipient: bool


@dataclass(slots=True)
class _Ledger:
    entries: list[_Entry] = field(default_factory=list)
    checked: set[str] = field(default_factory=set)  # recipients already charged
    groups: dict[tuple[str, str], _Entry] = field(default_factory=dict)  # (limit, value) -> message charge
    messages_charged: set[str] = field(default_factory=set)  # message-counted limits already charged


class RateLimitPolicy(Policy):
    name = "rate_limit"
    description = "per-user, per-sender, per-domain and global sending limits (GCRA, several windows, refunds)"

    @dataclass(frozen=True)
    class Options:
        limits: tuple[LimitSpec, ...] = doc("the limits; every one that applies must have room")

        def __post_init__(self) -> None:
            if not self.limits:
                raise ValueError("limits: give at least one limit, e.g. {key: auth_user, rates: [30/min]}")
            labels = [spec.label for spec in self.limits]
            for label in labels:
                if labels.count(label) > 1:
                    raise ValueError(f"two limits are called {label!r}; give one of them another name")

    def __init__(self, options: Any, resources: Mapping[str, Any] | None = None) -> None:
        super().__init__(options, resources)
        store = self.resources.get("limits")
        self._owns_store = store is None
        if store is None:
            log.info("rate_limit: no shared limit store given; budgets live in this policy instance only")
            store = MemoryLimitStore()
        self.store: LimitStore = store
        self.mx = MXRollup(self.resources.get("dns"))
        self._error_hook: Callable[[str], None] | None = self.resources.get("metrics_limit_errors")
        #: Called with the limit's name on every refusal (sendguard_ratelimit_refusals_total).
        self._refusal_hook: Callable[[str], None] | None = self.resources.get("metrics_limit_refusals")
        #: Store failures seen by this policy (reserve and refund), for the lead's metrics.
        self.store_errors = 0
        self._state_key = f"{self.name}@{id(self):x}"
        limits: tuple[LimitSpec, ...] = self.options.limits
        self._mail_limits = [s for s in limits if s.count == "messages" and s.key in ENVELOPE_KEYS]
        self._rcpt_limits = [
            s for s in limits if (s.count == "recipients" and s.key in ENVELOPE_KEYS) or s.key == "recipient_domain"
        ]
        # After DATA: From-domain limits, and message-counted ones that MAIL did not charge
        # (the pipeline skips check_mail while the class is unknown, for class-bound entries).
        self._message_limits = [
            s for s in limits if s.key == "from_domain" or (s.count == "messages" and s.key in ENVELOPE_KEYS)
        ]

    # ---- stages -------------------------------------------------------------------------

    async def check_mail(self, txn: Transaction) -> Verdict | None:
        if not self._mail_limits:
            return None
        ledger = self._ledger(txn)
        planned = self._plan_message_limits(txn, ledger, self._mail_limits, stage_cost=1)
        if not planned:
            return None
        verdict, reservation = await self._take(txn, planned)
        if reservation is not None:
            ledger.entries.append(_Entry(reservation, None, per_recipient=False))
            ledger.messages_charged.update(p.spec.label for p in planned)
            return Verdict.accept()
        return verdict

    async def check_rcpt(self, txn: Transaction, recipient: str) -> Verdict | None:
        if not self._rcpt_limits:
            return None
        ledger = self._ledger(txn)
        rcpt = recipient.lower()
        if rcpt in ledger.checked:
            return Verdict.accept("already counted in this transaction")
        domain = _domain_of(rcpt)
        each: list[_Planned] = []
        group_plans: dict[tuple[str, str], list[_Planned]] = {}
        joined: list[_Entry] = []
        for spec in self._rcpt_limits:
            if spec.key == "recipient_domain":
                if domain is None:
                    continue
                value = await self.mx.site(domain) if spec.mx_rollup else domain
                who = _who_recipient(domain, value, spec.mx_rollup)
            else:
                found = self._envelope_value(spec.key, txn)
                if found is None:
                    continue
                value, who = found, _WHO[spec.key].format(value=_printable(found))
            if spec.count == "messages":
                group = (spec.label, value)
                if group in ledger.groups:
                    joined.append(ledger.groups[group])
                    continue
                plans = self._plan(spec, value, who, cost=1)
                if plans:  # an override of [] makes this value unlimited
                    group_plans[group] = plans
            else:
                each += self._plan(spec, value, who, cost=1)
        planned = each + [p for plans in group_plans.values() for p in plans]
        if not planned:
            for entry in joined:
                assert entry.recipients is not None
                entry.recipients.add(rcpt)
            if joined:
                ledger.checked.add(rcpt)
                return Verdict.accept()
            return None
        verdict, reservation = await self._take(txn, planned)
        if reservation is None:
            return verdict
        charges = reservation.charges
        if each:
            part = reservation.part("r", charges[: len(each)])
            ledger.entries.append(_Entry(part, {rcpt}, per_recipient=True))
        offset = len(each)
        for index, (group, plans) in enumerate(group_plans.items()):
            part = reservation.part(f"g{index}", charges[offset : offset + len(plans)])
            offset += len(plans)
            entry = _Entry(part, {rcpt}, per_recipient=False)
            ledger.entries.append(entry)
            ledger.groups[group] = entry
        for entry in joined:
            assert entry.recipients is not None
            entry.recipients.add(rcpt)
        ledger.checked.add(rcpt)
        return Verdict.accept()

    async def check_message(self, txn: Transaction) -> Verdict | None:
        ledger = self._ledger(txn)
        pending = [s for s in self._message_limits if s.label not in ledger.messages_charged]
        if not pending or not txn.recipients:
            return None
        recipients = {r.lower() for r in txn.recipients}
        per_message = self._plan_message_limits(txn, ledger, [s for s in pending if s.count == "messages"], 1)
        per_recipient = self._plan_message_limits(
            txn, ledger, [s for s in pending if s.count == "recipients"], len(recipients)
        )
        planned = per_message + per_recipient
        if not planned:
            return None
        verdict, reservation = await self._take(txn, planned)
        if reservation is None:
            return verdict
        charges = reservation.charges
        if per_message:
            ledger.entries.append(_Entry(reservation.part("m", charges[: len(per_message)]), None, False))
        if per_recipient:
            part = reservation.part("mr", charges[len(per_message) :])
            ledger.entries.append(_Entry(part, set(recipients), per_recipient=True))
        ledger.messages_charged.update(p.spec.label for p in planned)
        return Verdict.accept()

    async def commit(self, txn: Transaction, outcome: Outcome) -> None:
        ledger: _Ledger | None = txn.state.pop(self._state_key, None)
        if ledger is None:
            return  # nothing charged, or committed before
        delivered = {r.lower() for r in outcome.delivered_recipients} if outcome.delivered else set()
        refunds: list[Reservation] = []
        for entry in ledger.entries:
            refund = _refund_for(entry, delivered)
            if refund is not None:
                refunds.append(refund)
        for index, reservation in enumerate(refunds):
            try:
                await self.store.refund(reservation)
            except LimitStoreError as error:
                # The budget stays charged for mail that did not go out: the safe direction.
                self._count_error("refund")
                log.warning(
                    "rate_limit: %d refund(s) for txn %s lost, the store failed: %s",
                    len(refunds) - index,
                    txn.txn_id,
                    error,
                )
                return

    async def close(self) -> None:
        if self._owns_store:
            await self.store.close()

    # ---- helpers ------------------------------------------------------------------------

    def _ledger(self, txn: Transaction) -> _Ledger:
        ledger = txn.state.get(self._state_key)
        if ledger is None:
            ledger = txn.state[self._state_key] = _Ledger()
        assert isinstance(ledger, _Ledger)
        return ledger

    @staticmethod
    def _envelope_value(kind: str, txn: Transaction) -> str | None:
        if kind == "auth_user":
            return normalize_value(kind, txn.auth_user) if txn.auth_user else None
        if kind == "mail_from":
            return normalize_value(kind, txn.mail_from) or "<>"
        if kind == "client_ip":
            return txn.client_ip.lower() or None
        if kind == "listener":
            return txn.listener
        if kind == "global":
            return "*"
        if kind == "from_domain":
            if txn.message is None:
                return None
            senders = txn.message.addresses("From")
            return _domain_of(senders[0].addr_spec) if senders else None
        return None

    def _plan(self, spec: LimitSpec, value: str, who: str, cost: int) -> list[_Planned]:
        return [
            _Planned(
                spec,
                value,
                rate,
                Charge(bucket_key(spec.label, rate.period, value), rate.interval, rate.burst, cost),
                who,
            )
            for rate in spec.rates_for(value)
        ]

    def _plan_message_limits(
        self, txn: Transaction, ledger: _Ledger, specs: Sequence[LimitSpec], stage_cost: int
    ) -> list[_Planned]:
        planned: list[_Planned] = []
        for spec in specs:
            if spec.label in ledger.messages_charged:
                continue
            value = self._envelope_value(spec.key, txn)
            if value is None:
                continue
            planned += self._plan(spec, value, _WHO[spec.key].format(value=_printable(value)), stage_cost)
        return planned

    async def _take(self, txn: Transaction, planned: list[_Planned]) -> tuple[Verdict | None, Reservation | None]:
        """Reserve every planned charge at once, holding as the limits allow. Returns
        (None, reservation) when granted, else (the verdict to give, None)."""
        charges = [p.charge for p in planned]
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            try:
                result = await self.store.reserve(charges)
            except LimitStoreError as error:
                return self._store_failed(txn, planned, error), None
            if result.granted:
                assert result.reservation is not None
                return None, result.reservation
            worst = max(result.blocking, key=lambda i: result.waits[i])
            wait = result.waits[worst]
            if wait == NEVER:
                self._count_refusal(planned[worst])
                return _too_many_recipients(planned[worst]), None
            hold = min(float(planned[i].spec.hold) for i in result.blocking)
            if deadline is None:
                deadline = loop.time() + hold
            if hold > 0 and loop.time() + wait <= deadline:
                await asyncio.sleep(wait + 0.001)  # a hair past the refill, not a spin before it
                continue
            self._count_refusal(planned[worst])
            return _over_limit(txn, planned[worst], wait), None

    def _count_refusal(self, planned: _Planned) -> None:
        if self._refusal_hook is not None:
            self._refusal_hook(planned.spec.label)

    def _store_failed(self, txn: Transaction, planned: list[_Planned], error: LimitStoreError) -> Verdict:
        self._count_error("reserve")
        strict = [p.spec.label for p in planned if p.spec.on_error == "tempfail"]
        log.warning("rate_limit: limit store failed for txn %s: %s", txn.txn_id, error)
        evidence = {"store_error": str(error)}
        if strict:
            return Verdict.tempfail(
                f"limit store unavailable; on_error: tempfail ({', '.join(sorted(set(strict)))})",
                f"Rate limit check could not be completed; try again later ({txn.txn_id})",
                status="4.3.0",
                evidence=evidence,
            )
        return Verdict.accept("limit store unavailable; not counted (on_error: accept)", evidence=evidence)

    def _count_error(self, operation: str) -> None:
        self.store_errors += 1
        if self._error_hook is not None:
            self._error_hook(operation)


def _refund_for(entry: _Entry, delivered: set[str]) -> Reservation | None:
    """The part of ``entry`` that was not used, or None when all of it was."""
    if entry.recipients is None:
        return None if delivered else entry.reservation
    undelivered = len(entry.recipients - delivered)
    if not entry.per_recipient:
        return entry.reservation if undelivered == len(entry.recipients) else None
    if undelivered == 0:
        return None
    if undelivered == len(entry.recipients):
        return entry.reservation
    # Some recipients of a per-recipient charge went out: give back one unit per other one.
    charges = [Charge(c.key, c.interval, c.burst, undelivered) for c in entry.reservation.charges]
    return entry.reservation.part(f"u{undelivered}", charges)


def _who_recipient(domain: str, value: str, mx_rollup: bool) -> str:
    if mx_rollup and value != domain:
        return f"mail server {_printable(value)} (recipient domain {_printable(domain)})"
    return f"recipient domain {_printable(domain)}"


def _over_limit(txn: Transaction, planned: _Planned, wait: float) -> Verdict:
    when = human_wait(wait)
    log.info(
        "rate limit %s (%s) reached for %s in txn %s; retry in %s",
        planned.spec.label,
        planned.rate,
        planned.who,
        txn.txn_id,
        when,
    )
    return Verdict.tempfail(
        f"{planned.spec.label} {planned.value} over {planned.rate}",
        f"Rate limit reached for {planned.who} ({planned.rate}); try again in {when}",
        status="4.7.1",
        evidence={
            "limit": planned.spec.label,
            "key": planned.value,
            "rate": str(planned.rate),
            "retry_after": math.ceil(wait),
        },
    )


def _too_many_recipients(planned: _Planned) -> Verdict:
    cost, burst = planned.charge.cost, planned.rate.burst
    return Verdict.reject(
        f"{planned.spec.label} {planned.value}: {cost} recipients exceed the burst of {planned.rate}",
        f"Message has {cost} recipients; the rate limit for {planned.who} ({planned.rate}) "
        f"lets at most {burst} through at once; send it in smaller batches",
        status="5.5.3",
        evidence={"limit": planned.spec.label, "key": planned.value, "rate": str(planned.rate), "cost": cost},
    )


def human_wait(seconds: float) -> str:
    """``37s``, ``12 min``, ``3 h``: rounded up, so the client never retries too early."""
    whole = max(1, math.ceil(seconds))
    if whole < 120:
        return f"{whole}s"
    if whole < 120 * 60:
        return f"{math.ceil(whole / 60)} min"
    return f"{math.ceil(whole / 3600)} h"


def _printable(value: str, limit: int = 80) -> str:
    """A client-supplied value made safe for a one-line reply."""
    cleaned = "".join(c if c.isprintable() else "?" for c in value)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
