"""The policy interface: replies, verdicts, the transaction view and the Policy base class.

A policy is a small class with a registry name, an options dataclass and up to three
checks, one per SMTP stage:

* ``check_mail``    - after MAIL FROM, sees the envelope sender;
* ``check_rcpt``    - per recipient, at RCPT time when the class is known from the
                      envelope, otherwise at DATA time for every recipient;
* ``check_message`` - after DATA, sees the parsed message.

Checks are pure questions: they never touch sockets and never change shared state.
Side effects (charging a rate limit, recording a bounce) belong in ``commit``, which the
pipeline calls once the outcome of the transaction is known.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from policies.message import ParsedMessage

__all__ = (
    "MESSAGE_CLASSES",
    "Action",
    "MessageEdit",
    "Outcome",
    "Policy",
    "PolicyError",
    "Reply",
    "Transaction",
    "Verdict",
)

#: The message classes a transaction can have. Policies say which ones they apply to.
MESSAGE_CLASSES: tuple[str, ...] = ("commercial", "transactional")

_ENHANCED_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_FORBIDDEN_IN_TEXT = re.compile(r"[\x00-\x1f\x7f]")


class Action(enum.StrEnum):
    """What a policy (or the pipeline) decided."""

    ACCEPT = "accept"
    REJECT = "reject"  # permanent: 5xx, the sender must change something
    TEMPFAIL = "tempfail"  # temporary: 4xx, the sender should retry later


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply with an RFC 3463 enhanced status code.

    The class of the code and of the enhanced status must agree (RFC 3463 section 2):
    a 550 carries 5.x.x, a 451 carries 4.x.x. Text is a single line without control
    characters, so a reply can never inject protocol lines.
    """

    code: int
    status: str
    text: str
    #: The code the upstream itself sent, when the proxy answers its client with another
    #: (an upstream 421 is relayed as 451); backoff rules match and quote the upstream's own.
    upstream_code: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")
        if not _ENHANCED_STATUS.match(self.status):
            raise ValueError(f"not an enhanced status code: {self.status!r}")
        if int(self.status[0]) != self.code // 100:
            raise ValueError(f"reply code {self.code} and enhanced status {self.status} disagree")
        if _FORBIDDEN_IN_TEXT.search(self.text):
            raise ValueError("reply text must be one line without control characters")

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    def line(self) -> str:
        return f"{self.code} {self.status} {self.text}"

    def __str__(self) -> str:
        return self.line()


@dataclass(frozen=True, slots=True)
class MessageEdit:
    """A change a policy asks for; applied by the proxy, in enforce mode only, before signing.

    ``split_per_recipient`` asks the proxy to deliver one copy per recipient, each showing
    only that recipient in To: (Cc: removed), instead of one copy that shows everyone.
    ``per_recipient`` adds header fields to one recipient's copy only (e.g. that recipient's
    own unsubscribe link); it also makes the proxy deliver one copy per recipient.
    ``footer`` is a (plain text, HTML) pair appended to the message's readable body parts;
    ``per_recipient_footer`` gives each recipient's copy its own (and fans out).
    """

    add: tuple[tuple[str, str], ...] = ()  # (name, value) pairs prepended to the header block
    remove: tuple[str, ...] = ()  # field names removed wherever they occur
    split_per_recipient: bool = False
    per_recipient: Mapping[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    footer: tuple[str, str] | None = None
    per_recipient_footer: Mapping[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def fans_out(self) -> bool:
        return self.split_per_recipient or bool(self.per_recipient) or bool(self.per_recipient_footer)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy's answer: an action, the reply the client should see and why.

    ``reason`` is for the operator (logs, audit, ``sendguard check``); ``reply`` is what the
    client sees. ``evidence`` names what the decision relied on (e.g. a consent record id)
    and lands in the audit log.
    """

    action: Action
    reason: str = ""
    reply: Reply | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    edit: MessageEdit | None = None

    def __post_init__(self) -> None:
        if self.action is not Action.ACCEPT and self.reply is None:
            raise ValueError("a reject or tempfail verdict needs a reply")
        if self.reply is not None:
            if self.action is Action.REJECT and self.reply.code < 500:
                raise ValueError("a reject needs a 5xx reply")
            if self.action is Action.TEMPFAIL and not self.reply.is_temporary:
                raise ValueError("a tempfail needs a 4xx reply")

    @classmethod
    def accept(
        cls,
        reason: str = "",
        *,
        evidence: Mapping[str, Any] | None = None,
        edit: MessageEdit | None = None,
    ) -> Verdict:
        return cls(Action.ACCEPT, reason, None, evidence or {}, edit)

    @classmethod
    def reject(
        cls,
        reason: str,
        text: str,
        *,
        status: str = "5.7.1",
        code: int = 550,
        evidence: Mapping[str, Any] | None = None,
    ) -> Verdict:
        return cls(Action.REJECT, reason, Reply(code, status, text), evidence or {})

    @classmethod
    def tempfail(
        cls,
        reason: str,
        text: str,
        *,
        status: str = "4.7.1",
        code: int = 451,
        evidence: Mapping[str, Any] | None = None,
    ) -> Verdict:
        return cls(Action.TEMPFAIL, reason, Reply(code, status, text), evidence or {})


@dataclass(slots=True)
class Transaction:
    """What policies see of one SMTP transaction. Built by the proxy (or ``sendguard check``).

    Policies treat it as read-only. ``message`` is set after DATA: the one parse of the
    message that every policy shares. ``message_class`` is set as soon as it is known,
    from the envelope at MAIL time or from the headers after DATA.
    """

    txn_id: str
    listener: str
    client_ip: str
    helo: str | None = None
    auth_user: str | None = None
    tls: bool = False
    mail_from: str = ""
    recipients: list[str] = field(default_factory=list)
    message_class: str | None = None
    #: Why the message counts as commercial, in a few words for a refusal's text ("judged
    #: commercial: score 7.5, discount (20% korting), utm_links"); empty when not commercial.
    class_note: str = ""
    message: ParsedMessage | None = None
    size: int = 0
    #: Per-policy scratch space for bookkeeping between a check and ``commit`` (e.g. the
    #: rate-limit reservations to refund), keyed by the policy's id.
    state: dict[str, Any] = field(default_factory=dict)
    #: The pipeline's record of per-recipient checks already made: (policy id, recipient)
    #: -> the class they ran under ("*" when the policy applies to every class).
    rcpt_checks: dict[tuple[str, str], str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a transaction ended, given to ``Policy.commit``."""

    delivered: bool
    delivered_recipients: Sequence[str] = ()
    refused_recipients: Mapping[str, Reply] = field(default_factory=dict)
    reply: Reply | None = None


class PolicyError(Exception):
    """A policy could not decide (store down, bad data). The pipeline applies ``on_error``."""


class Policy:
    """Base class for every policy. Subclasses set ``name``, ``description`` and ``Options``.

    ``Options`` is a dataclass; the config loader validates a policy's YAML entry against
    it (unknown keys are errors) and passes the instance to ``__init__``. ``resources``
    gives access to shared stores (consent, limiter) without the policy knowing how they
    are built.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: Classes the policy applies to unless its config entry says otherwise.
    default_classes: ClassVar[tuple[str, ...]] = MESSAGE_CLASSES
    #: Shared stores the policy needs in ``resources`` ("consent", "limits", "dns" ...): the
    #: application opens a store only when a configured policy asks for it.
    needs: ClassVar[tuple[str, ...]] = ()
    #: A legal check that must never let mail through when it cannot decide: ``on_error:
    #: accept`` is refused in the config (the consent check is one).
    fails_closed: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: Any, resources: Mapping[str, Any] | None = None) -> None:
        self.options = options
        self.resources: Mapping[str, Any] = resources or {}

    # Each check returns None when the policy has nothing to say at that stage. A
    # ``check_rcpt`` that returns None at RCPT time (it needs the headers to decide, say)
    # is asked again for that recipient after DATA, when ``txn.message`` is set.
    async def check_mail(self, txn: Transaction) -> Verdict | None:
        return None

    async def check_rcpt(self, txn: Transaction, recipient: str) -> Verdict | None:
        return None

    async def check_message(self, txn: Transaction) -> Verdict | None:
        return None

    async def commit(self, txn: Transaction, outcome: Outcome) -> None:
        return None

    async def close(self) -> None:
        return None

    @classmethod
    def instruction_headers(cls, options: Any) -> tuple[str, ...]:
        """Header fields that instruct this policy (e.g. a topic header): meant for sendguard,
        never for the recipients, so the proxy removes them before relaying."""
        return ()

    @classmethod
    def headers_added(cls, options: Any) -> tuple[str, ...]:
        """Header fields this policy adds to every message it applies to (in enforce mode), so
        that a policy judging the incoming message can count them as present."""
        return ()

    @classmethod
    def personal_edits(cls, options: Any) -> bool:
        """True when this policy, so configured, may give each recipient header fields or a
        footer of their own (``MessageEdit.per_recipient``, ``per_recipient_footer``). Where
        only one message can leave (the milter) such mail then takes one recipient at a time."""
        return False

    @classmethod
    def splits(cls, options: Any) -> str | None:
        """Why this policy, so configured, may change the message for each recipient beyond
        personal fields (``MessageEdit.split_per_recipient``): the option that makes it do so,
        or None. Such a policy cannot run where only one message can leave (the milter)."""
        return None

    @classmethod
    def has_stage(cls, stage: str) -> bool:
        """True when the subclass overrides the check for ``stage`` (mail, rcpt, message)."""
        method = getattr(cls, f"check_{stage}")
        return method is not getattr(Policy, f"check_{stage}")
