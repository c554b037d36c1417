"""What the commercial-mail detector reports: signals, their groups and weights, a detection
(score, verdict, the signals that fired) and the numbers an admin may tune."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = (
    "COMMERCIAL_GROUPS",
    "COUNTER_GROUPS",
    "DEFAULT_WEIGHTS",
    "SIGNAL_GROUPS",
    "WORD_CAPS",
    "Detection",
    "DetectorTuning",
    "Signal",
    "Verdict",
)

Verdict = Literal["commercial", "grey", "transactional"]

#: Each signal's group: the groups are what the metric counts and what a refusal names.
SIGNAL_GROUPS: Mapping[str, str] = {
    "promotion_words": "promotion",
    "discount": "promotion",
    "price+call_to_action": "promotion",
    "call_to_action": "promotion",
    "deadline": "promotion",
    "cross_sell": "promotion",
    "event_invitation": "promotion",
    "advertisement_label": "promotion",
    "fundraising": "fundraising",
    "ideological": "ideological",
    "outreach": "outreach",
    "list_unsubscribe_header": "bulk_mail",
    "list_id_header": "bulk_mail",
    "precedence_bulk": "bulk_mail",
    "campaign_headers": "bulk_mail",
    "esp_mailer": "bulk_mail",
    "feedback_id": "bulk_mail",
    "tracking_pixel": "bulk_mail",
    "click_tracking": "bulk_mail",
    "utm_links": "bulk_mail",
    "newsletter_layout": "bulk_mail",
    "web_version": "bulk_mail",
    "unsubscribe_wording": "bulk_mail",
    "subscription_footer": "bulk_mail",
    "role_sender": "bulk_mail",
    "transactional_words": "transactional",
    "account_words": "transactional",
    "reference_number": "transactional",
    "delivery_report": "transactional",
    "auto_reply": "transactional",
    "reply": "conversation",
    "quoted_text": "conversation",
    "internal": "conversation",
    "discussion_list": "discussion_list",
}

#: The groups that make mail commercial, and those that speak against it.
COMMERCIAL_GROUPS = ("promotion", "fundraising", "ideological", "outreach", "bulk_mail")
COUNTER_GROUPS = ("transactional", "conversation", "discussion_list")

#: Weight of each signal. For word signals it is the weight of each distinct entry found,
#: up to ``WORD_CAPS`` entries.
DEFAULT_WEIGHTS: Mapping[str, float] = {
    "promotion_words": 1.0,
    "discount": 2.0,
    "price+call_to_action": 2.0,
    "call_to_action": 0.75,
    "deadline": 1.0,
    "cross_sell": 2.5,
    "event_invitation": 0.75,
    "advertisement_label": 4.0,
    "fundraising": 1.5,
    "ideological": 1.25,
    "outreach": 1.25,
    "list_unsubscribe_header": 2.0,
    "list_id_header": 0.5,
    "precedence_bulk": 1.5,
    "campaign_headers": 2.0,
    "esp_mailer": 2.0,
    "feedback_id": 0.5,
    "tracking_pixel": 1.0,
    "click_tracking": 1.0,
    "utm_links": 1.0,
    "newsletter_layout": 1.0,
    "web_version": 2.0,
    "unsubscribe_wording": 2.0,
    "subscription_footer": 1.5,
    "role_sender": 2.0,
    "transactional_words": -1.0,
    "account_words": -1.0,
    "reference_number": -1.5,
    "delivery_report": -8.0,
    "auto_reply": -6.0,
    "reply": -3.0,
    "quoted_text": -1.0,
    "internal": -2.5,
    "discussion_list": -4.0,
}

#: How many distinct entries of a word signal count.
WORD_CAPS: Mapping[str, int] = {
    "promotion_words": 4,
    "call_to_action": 3,
    "deadline": 2,
    "cross_sell": 2,
    "event_invitation": 3,
    "fundraising": 3,
    "ideological": 3,
    "outreach": 4,
    "transactional_words": 4,
    "account_words": 3,
}

#: Word list -> the signal it feeds (web_version, unsubscribe and subscription count once).
LIST_SIGNAL = {
    "promotion": "promotion_words",
    "call_to_action": "call_to_action",
    "deadline": "deadline",
    "cross_sell": "cross_sell",
    "event": "event_invitation",
    "fundraising": "fundraising",
    "ideological": "ideological",
    "outreach": "outreach",
    "web_version": "web_version",
    "unsubscribe": "unsubscribe_wording",
    "subscription": "subscription_footer",
    "transactional": "transactional_words",
    "account": "account_words",
}

#: The whole of the counter-signals may lower the score by at most this much, so that a
#: receipt cannot carry unlimited advertising; a delivery report or auto-reply is exempt.
COUNTER_CAP = 6.0
#: With cross-selling in it ("you may also like"), a receipt's own wording lowers the score by
#: at most this much: the advertising in a receipt needs consent (commercial-mail.md).
COUNTER_CAP_WITH_CROSS_SELL = 3.0


@dataclass(frozen=True, slots=True)
class Signal:
    """One reason, with its weight and what was found (words, counts, header names)."""

    name: str
    weight: float
    detail: str = ""

    @property
    def group(self) -> str:
        return SIGNAL_GROUPS.get(self.name, "other")

    def describe(self) -> str:
        return f"{self.name} ({self.detail})" if self.detail else self.name


@dataclass(frozen=True, slots=True)
class Detection:
    score: float
    verdict: Verdict
    signals: tuple[Signal, ...]

    @property
    def groups(self) -> dict[str, float]:
        """Score per signal group, rounded for reading."""
        out: dict[str, float] = {}
        for signal in self.signals:
            out[signal.group] = round(out.get(signal.group, 0.0) + signal.weight, 2)
        return out

    @property
    def decided_by(self) -> str:
        """The group that weighs most in the direction of the verdict ("none" without signals)."""
        groups = self.groups
        if self.verdict == "transactional":
            against = {g: v for g, v in groups.items() if g in COUNTER_GROUPS and v < 0}
            return min(against, key=lambda g: against[g]) if against else "weak_signals"
        toward = {g: v for g, v in groups.items() if g in COMMERCIAL_GROUPS and v > 0}
        return max(toward, key=lambda g: toward[g]) if toward else "none"

    def explain(self, limit: int = 4) -> str:
        """The strongest reasons toward the verdict, for a reply text."""
        toward = [s for s in self.signals if (s.weight > 0) == (self.verdict != "transactional")]
        toward.sort(key=lambda s: abs(s.weight), reverse=True)
        return ", ".join(s.describe() for s in toward[:limit])

    def as_dict(self) -> dict[str, Any]:
        return {
            "score": round(self.score, 2),
            "verdict": self.verdict,
            "decided_by": self.decided_by,
            "signals": [s.describe() for s in sorted(self.signals, key=lambda s: -abs(s.weight))],
            "groups": self.groups,
        }


@dataclass(frozen=True)
class DetectorTuning:
    """The numbers an admin may change (``classes.detector`` in the config)."""

    commercial_at: float = 4.0
    grey_from: float = 2.5
    weights: Mapping[str, float] = field(default_factory=dict)
