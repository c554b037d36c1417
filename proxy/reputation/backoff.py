"""Upstream backoff: rules that watch the upstream's replies and pause sending when it pushes back.

A rule matches replies by code, enhanced status and text; when it has matched ``threshold``
times in its window (counted across every instance through the pause store), it pauses a
class of mail, one sender or everything for ``duration``. KumoMTA's Traffic Shaping
Automation and PowerMTA's backoff mode work the same way; the difference here is that
pausing the commercial class leaves transactional mail (password resets, invoices) flowing.

Typical replies worth a rule: ``421 4.7.0 ... try again later``; Gmail's ``4.7.28`` /
``5.7.28`` (rate and spam limits); Microsoft 365's ``5.7.705`` / ``5.7.708`` (tenant or IP
restricted); ``550 5.7.1 ... blocked using Spamhaus``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
import time
from dataclasses import dataclass
from typing import Literal

from policies.base import Reply, Transaction
from proxy.observability.metrics import Metrics
from proxy.schema import Duration, Rate, doc
from proxy.stores.pauses import Pause, PauseStore

__all__ = ("BackoffConfig", "BackoffRule", "ReplyMatch", "Backoff", "sender_domains")

log = logging.getLogger("sendguard.backoff")


@dataclass(frozen=True)
class ReplyMatch:
    code: str | None = doc("reply code or class: 421, 550, 4xx, 5xx", default=None)
    status: str | None = doc("enhanced status, globs allowed: 4.7.0, 5.7.*", default=None)
    text: str | None = doc("regular expression searched in the reply text (case-insensitive)", default=None)
    stage: Literal["any", "mail", "rcpt", "data"] = doc("SMTP stage of the reply", default="any")

    def __post_init__(self) -> None:
        if self.code is not None and not re.fullmatch(r"[245](\d\d|xx)", self.code):
            raise ValueError(f"code must look like 421, 550, 4xx or 5xx, not {self.code!r}")
        if self.text is not None:
            try:
                re.compile(self.text)
            except re.error as exc:
                raise ValueError(f"text: bad regular expression: {exc}") from None
        if self.code is None and self.status is None and self.text is None:
            raise ValueError("a match needs at least one of code, status, text")


@dataclass(frozen=True)
class BackoffRule:
    name: str = doc("names the rule in logs, metrics and the audit log")
    match: ReplyMatch = doc("which upstream replies count")
    threshold: Rate = doc("how many matches in which window trigger the action, e.g. 5/10m", default=Rate(1, 60))
    scope: Literal["class", "sender", "all"] = doc(
        "what to pause: a class of mail, the sender whose mail drew the replies, or everything", default="class"
    )
    message_class: Literal["commercial", "transactional"] = doc(
        "the class paused when scope is class", default="commercial", key="class"
    )
    duration: Duration = doc("how long the pause lasts", default=Duration(1800))


@dataclass(frozen=True)
class BackoffConfig:
    rules: tuple[BackoffRule, ...] = doc("every rule a reply matches counts it", default=())


def sender_domains(txn: Transaction) -> tuple[str, ...]:
    """The domains a transaction sends for: the From: header's and the envelope sender's."""
    domains: list[str] = []
    if txn.message is not None:
        for address in txn.message.addresses("From"):
            if "@" in address.addr_spec:
                domains.append(address.addr_spec.rsplit("@", 1)[1].lower())
    if "@" in txn.mail_from:
        domains.append(txn.mail_from.rsplit("@", 1)[1].lower())
    return tuple(dict.fromkeys(domains))


class Backoff:
    def __init__(self, config: BackoffConfig, store: PauseStore, metrics: Metrics | None = None) -> None:
        self.rules = config.rules
        self.store = store
        self.metrics = metrics
        self._texts = {rule.name: re.compile(rule.match.text, re.I) for rule in config.rules if rule.match.text}

    def _matches(self, rule: BackoffRule, stage: str, reply: Reply) -> bool:
        match = rule.match
        if match.stage != "any" and match.stage != stage:
            return False
        if match.code is not None:
            wanted, sent = match.code, str(reply.upstream_code or reply.code)  # the upstream's own
            if wanted.endswith("xx") and sent[0] != wanted[0]:
                return False
            if not wanted.endswith("xx") and sent != wanted:
                return False
        if match.status is not None and not fnmatch.fnmatchcase(reply.status, match.status):
            return False
        pattern = self._texts.get(rule.name)
        return pattern is None or bool(pattern.search(reply.text))

    async def observe(self, stage: str, reply: Reply, txn: Transaction) -> None:
        """Count an upstream reply against every rule it matches; pause when a threshold is hit."""
        if reply.is_success or not self.rules:
            return
        for rule in self.rules:
            if not self._matches(rule, stage, reply):
                continue
            domains = sender_domains(txn)
            targets: list[str]
            if rule.scope == "sender":
                targets = list(domains[:1])  # the From domain if known, else the envelope's
                if not targets:
                    continue
            elif rule.scope == "class":
                targets = [rule.message_class]
            else:
                targets = ["*"]
            for target in targets:
                count = await self.store.hit(f"backoff:{rule.name}:{target}", rule.threshold.period)
                if self.metrics is not None:
                    self.metrics.backoff_matches.labels(rule.name).inc()
                if count < rule.threshold.count:
                    continue
                until = time.time() + rule.duration
                reason = (
                    f'the upstream answered "{reply.upstream_code or reply.code} {reply.status} {reply.text[:120]}" '
                    f"{count} times within {rule.threshold}"
                )
                await self.store.pause(Pause(rule.scope, target, until, reason, f"backoff:{rule.name}"))
                if self.metrics is not None:
                    self.metrics.backoff_pauses.labels(rule.name, rule.scope).inc()
                log.warning(
                    "backoff rule %s pauses %s %s for %ss: %s",
                    rule.name,
                    rule.scope,
                    target,
                    int(rule.duration),
                    reason,
                )
