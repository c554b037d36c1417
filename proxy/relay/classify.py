"""Decide whether a transaction is commercial or transactional, and say why.

Order of precedence, most specific first:

1. the class header (``X-Sendguard-Class`` by default). ``commercial`` is believed from
   anyone, since it only adds checks; ``transactional`` only from the listeners and AUTH
   users the config names (nobody by default: a network address, loopback included, proves
   nothing about who wrote a message);
2. the first class rule that matches (the admin's overrides for known cases);
3. the commercial-mail detector (``policies/commercial/``), in ``enforce`` mode: its
   verdict, with the grey zone going to ``grey_outcome``;
4. the configured default (detector off or in monitor mode).

A believed ``transactional`` declaration, by header or by rule, is checked against the
detector too: on mail it finds clearly commercial, ``declared_transactional`` says whether
it is refused, treated as commercial, believed but logged and counted (monitor), or
believed. Advertising inside a receipt needs consent whoever calls it a receipt.

``from_envelope`` answers at MAIL time when rules that need only the envelope decide;
``from_message`` gives the final class after DATA, with its explanation
(``Classification.as_dict``) for the audit line and ``sendguard check``.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from dataclasses import dataclass
from typing import Any

from policies.base import Reply, Transaction
from policies.commercial import CommercialDetector, Detection, DetectorTuning, load_word_lists
from policies.message import ParsedMessage
from proxy.config.settings import ClassesConfig, ClassRule
from proxy.observability.metrics import Metrics

__all__ = ("Classification", "Classifier")

log = logging.getLogger("sendguard.classify")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Classification:
    message_class: str
    #: What decided: "header", "rule N", "detector", "grey zone", "default".
    reason: str
    detection: Detection | None = None
    #: The detector ran only to watch (monitor mode): its verdict did not decide.
    monitored: bool = False
    #: "transactional" when a header or rule declared it (believed or not), with who.
    declared: str | None = None
    #: Set when a transactional declaration is refused (declared_transactional: refuse).
    refusal: Reply | None = None
    #: What ``declared_transactional`` did with a believed declaration on commercial-looking mail.
    overruled: str | None = None

    @property
    def decided_by(self) -> str:
        if self.overruled in ("refuse", "commercial"):
            return "declared_but_commercial"
        if self.reason == "header" or self.reason.startswith("rule"):
            return "rule" if self.reason.startswith("rule") else "header"
        if self.reason == "grey zone":
            return "grey_zone"
        if self.reason == "detector" and self.detection is not None:
            return self.detection.decided_by
        return "default"

    def note(self) -> str:
        """Why the detector judged the message commercial, for the text of a refusal ("" when a
        rule or header decided: the sender's admin or program said so)."""
        if self.message_class != "commercial":
            return ""
        if self.detection is not None and not self.monitored and self.detection.score > 0:
            # The signals quote the message ("sconto\r\naddizionale"): a reply is one line of
            # text without control characters (RFC 5321 4.2), or the refusal itself would fail.
            explained = " ".join(_CONTROL.sub(" ", self.detection.explain(3)).split())
            return f"judged commercial: score {self.detection.score:g}, {explained}"
        return ""  # a rule or header: the sender's own admin or program said so

    def observe(self, metrics: Metrics, detector_mode: str) -> None:
        """Count this decision in ``sendguard_classifications_total`` and the detector's verdict."""
        metrics.classifications.labels(self.message_class, self.decided_by).inc()
        if self.detection is not None:
            mode = "monitor" if detector_mode == "monitor" else "enforce"
            metrics.detector_verdicts.labels(self.detection.verdict, mode).inc()
        if self.overruled is not None:
            metrics.declared_transactional.labels(self.overruled).inc()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"class": self.message_class, "source": self.reason, "decided_by": self.decided_by}
        if self.declared:
            out["declared"] = self.declared
        if self.overruled:
            out["declared_transactional"] = self.overruled
        if self.detection is not None:
            detection = self.detection.as_dict()
            out.update(
                score=detection.pop("score"),
                verdict=detection.pop("verdict"),
                signals=detection.pop("signals"),
                groups=detection.pop("groups"),
            )
            if self.monitored:
                out["mode"] = "monitor"
        return out


def _glob_any(value: str, patterns: tuple[str, ...]) -> bool:
    lowered = value.lower()
    return any(fnmatch.fnmatchcase(lowered, p.lower()) for p in patterns)


class Classifier:
    def __init__(self, config: ClassesConfig) -> None:
        self.config = config
        self._matchers = [
            {name.lower(): re.compile(pattern, re.I) for name, pattern in rule.header_matches.items()}
            for rule in config.rules
        ]
        detector = config.detector
        self.detector: CommercialDetector | None = None
        if detector.mode != "off":
            tuning = DetectorTuning(detector.commercial_at, detector.grey_from, dict(detector.weights))
            self.detector = CommercialDetector(tuning, load_word_lists(detector.words_file, detector.extra_words))

    @property
    def enforcing(self) -> bool:
        return self.config.detector.mode == "enforce"

    def from_envelope(self, txn: Transaction) -> Classification | None:
        """The class if envelope-only rules decide it; None when headers or content decide."""
        for index, rule in enumerate(self.config.rules):
            if not rule.envelope_only:
                return None
            if self._envelope_matches(rule, txn):
                return Classification(rule.message_class, f"rule {index}")
        if self.enforcing:
            return None
        return Classification(self.config.fallback, "default")

    def from_message(self, txn: Transaction, message: ParsedMessage) -> Classification:
        header = self.config.header
        stated = (message.header(header.name) or "").strip().lower()
        if stated == "commercial":
            return Classification("commercial", "header")
        declared: str | None = None
        if stated == "transactional":
            if self._header_trusted(txn):
                return self._declared_transactional(txn, message, "header", f"{header.name} header")
            declared = f"transactional by {header.name} header, not believed (sender not trusted)"
        for index, rule in enumerate(self.config.rules):
            if self._envelope_matches(rule, txn) and self._message_matches(index, rule, message):
                if rule.message_class == "transactional":
                    return self._declared_transactional(txn, message, f"rule {index}", f"class rule {index}")
                return Classification(rule.message_class, f"rule {index}", declared=declared)
        if self.detector is None:
            return Classification(self.config.fallback, "default", declared=declared)
        detection = self.detect(txn, message)
        if not self.enforcing:
            return Classification(self.config.fallback, "default", detection, monitored=True, declared=declared)
        if detection.verdict == "commercial":
            return Classification("commercial", "detector", detection, declared=declared)
        if detection.verdict == "grey":
            outcome = self.config.detector.grey_outcome
            return Classification(outcome, "grey zone", detection, declared=declared)
        return Classification("transactional", "detector", detection, declared=declared)

    def detect(self, txn: Transaction, message: ParsedMessage) -> Detection:
        assert self.detector is not None
        return self.detector.detect(message, mail_from=txn.mail_from, recipients=txn.recipients)

    def _declared_transactional(
        self, txn: Transaction, message: ParsedMessage, reason: str, who: str
    ) -> Classification:
        """A believed transactional declaration, checked against what the message says."""
        declared = f"transactional by {who}"
        if self.detector is None:
            return Classification("transactional", reason, declared=declared)
        detection = self.detect(txn, message)
        if detection.verdict != "commercial":
            return Classification("transactional", reason, detection, declared=declared)
        choice = self.config.header.declared_transactional
        log.info(
            "txn %s declared transactional (%s) but reads as commercial (score %s): %s",
            txn.txn_id,
            who,
            detection.score,
            choice,
        )
        if choice == "refuse":
            text = (
                f"declared transactional ({who}), but the message reads as commercial mail (score "
                f"{detection.score:g}: {detection.explain(3)}); commercial mail needs the recipient's consent "
                "and an unsubscribe link: remove the advertising or send it without the declaration"
            )
            refusal = Reply(550, "5.7.1", text[:440])
            return Classification("commercial", reason, detection, declared=declared, refusal=refusal, overruled=choice)
        if choice == "commercial":
            return Classification("commercial", reason, detection, declared=declared, overruled=choice)
        return Classification("transactional", reason, detection, declared=declared, overruled=choice)

    def _header_trusted(self, txn: Transaction) -> bool:
        header = self.config.header
        if txn.listener in header.trusted_listeners:
            return True
        return bool(txn.auth_user and txn.auth_user in header.trusted_users)

    @staticmethod
    def _envelope_matches(rule: ClassRule, txn: Transaction) -> bool:
        if rule.listeners and txn.listener not in rule.listeners:
            return False
        if rule.auth_users and (txn.auth_user or "") not in rule.auth_users:
            return False
        return not (rule.mail_from and not _glob_any(txn.mail_from, rule.mail_from))

    def _message_matches(self, index: int, rule: ClassRule, message: ParsedMessage) -> bool:
        if rule.header_from:
            senders = message.addresses("From")
            if not any(_glob_any(a.addr_spec, rule.header_from) for a in senders):
                return False
        if rule.headers_present and not any(message.has_header(name) for name in rule.headers_present):
            return False
        for name, pattern in self._matchers[index].items():
            if not any(pattern.search(value) for value in message.header_values(name)):
                return False
        return True
