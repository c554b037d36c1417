"""Run the ordered policy list over a transaction, stage by stage.

Rules the runner enforces so that no policy has to:

* a policy runs only for the classes its entry names; at RCPT time that needs the class
  to be known from the envelope. A per-recipient policy that could not run at RCPT time
  (class unknown then, or changed by the headers) runs at DATA time for every recipient,
  and the recipients it refuses are named together in one reply;
* each check runs under the entry's timeout; a failure or timeout becomes ``on_error``
  (451 4.3.0 with the transaction id, or accept), the traceback goes to the log, never to
  the client;
* ``monitor`` mode records and counts the decision and lets the mail pass; its header
  edits are not applied;
* the first effective reject or tempfail ends the stage; in ``exhaustive`` mode (``sendguard
  check``) every policy still runs, the first refusal decides and is marked ``decided``, so
  that a sender sees every problem of a message in one round.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from policies.base import MESSAGE_CLASSES, Action, MessageEdit, Outcome, Policy, Reply, Transaction, Verdict
from proxy.config.settings import PolicyEntry
from proxy.replies import r451_policy_error

__all__ = ("Pipeline", "PipelineObserver", "PolicyResult", "StageDecision")

log = logging.getLogger("sendguard.pipeline")


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    stage: str
    action: Action
    mode: str
    reason: str = ""
    reply: Reply | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)
    recipient: str | None = None
    error: bool = False
    duration: float = 0.0
    #: This result's refusal is the one the client gets (marked in exhaustive mode).
    decided: bool = False

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "policy": self.policy,
            "stage": self.stage,
            "action": str(self.action),
            "mode": self.mode,
            "reason": self.reason,
        }
        if self.reply is not None:
            out["reply"] = self.reply.line()
        if self.recipient is not None:
            out["recipient"] = self.recipient
        if self.evidence:
            out["evidence"] = dict(self.evidence)
        if self.error:
            out["error"] = True
        if self.decided:
            out["decided"] = True
        return out


@dataclass(slots=True)
class StageDecision:
    action: Action = Action.ACCEPT
    reply: Reply | None = None
    results: list[PolicyResult] = field(default_factory=list)
    edits: list[MessageEdit] = field(default_factory=list)
    #: Recipients refused for good after DATA while others may have the message: the relay
    #: delivers one copy to each of the others and reports these to the sender (never a 250
    #: that hides them, never a refusal that sinks the recipients who consented).
    held: dict[str, Reply] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.action is Action.ACCEPT


class PipelineObserver(Protocol):
    def policy_verdict(self, policy: str, action: str, mode: str, duration: float) -> None: ...
    def policy_error(self, policy: str) -> None: ...


@dataclass
class _Slot:
    entry: PolicyEntry
    policy: Policy

    @property
    def commits(self) -> bool:
        return type(self.policy).commit is not Policy.commit

    @property
    def all_classes(self) -> bool:
        return set(MESSAGE_CLASSES) <= set(self.entry.classes)


class Pipeline:
    def __init__(
        self,
        entries: tuple[PolicyEntry, ...],
        resources: Mapping[str, Any] | None = None,
        observer: PipelineObserver | None = None,
        *,
        exhaustive: bool = False,
    ) -> None:
        self.entries = entries
        self.observer = observer
        self.exhaustive = exhaustive
        self.slots = [_Slot(e, e.policy_class(e.options, resources)) for e in entries]

    @property
    def policy_ids(self) -> list[str]:
        return [slot.entry.id for slot in self.slots]

    async def close(self) -> None:
        for slot in self.slots:
            try:
                await slot.policy.close()
            except Exception:
                log.exception("policy %s failed to close", slot.entry.id)

    # ---- stages -----------------------------------------------------------------------

    async def check_mail(self, txn: Transaction) -> StageDecision:
        decision = StageDecision()
        for slot in self.slots:
            if not slot.policy.has_stage("mail") or not self._applies(slot, txn.message_class):
                continue
            if await self._record(decision, slot, txn, "mail", functools.partial(slot.policy.check_mail, txn)):
                break
        return decision

    async def check_rcpt(self, txn: Transaction, recipient: str) -> StageDecision:
        """Per-recipient checks at RCPT time, for the policies that apply to the class known
        so far. Each check that gave an answer is recorded in ``txn.rcpt_checks``."""
        decision = StageDecision()
        for slot in self.slots:
            if not slot.policy.has_stage("rcpt"):
                continue
            if slot.all_classes:
                scope = "*"
            elif txn.message_class is not None and txn.message_class in slot.entry.classes:
                scope = txn.message_class
            else:
                continue  # class unknown yet, or the policy does not apply to it
            before = len(decision.results)
            check = functools.partial(slot.policy.check_rcpt, txn, recipient)
            stop = await self._record(decision, slot, txn, "rcpt", check, recipient)
            if len(decision.results) > before:
                txn.rcpt_checks[(slot.entry.id, recipient)] = scope
            if stop:
                break
        return decision

    async def check_message(self, txn: Transaction) -> StageDecision:
        decision = StageDecision()
        for slot in self.slots:
            if not self._applies(slot, txn.message_class):
                continue
            if slot.policy.has_stage("rcpt"):
                pending = [
                    r for r in txn.recipients
                    if txn.rcpt_checks.get((slot.entry.id, r)) not in ("*", txn.message_class)
                    and r not in decision.held
                ]  # fmt: skip
                if pending and await self._deferred_recipients(decision, slot, txn, pending):
                    return decision
            check = functools.partial(slot.policy.check_message, txn)
            if slot.policy.has_stage("message") and await self._record(decision, slot, txn, "message", check):
                return decision
        return decision

    async def commit(self, txn: Transaction, outcome: Outcome) -> None:
        for slot in self.slots:
            if not slot.commits:
                continue  # most policies keep no state: no task, no timeout to set up
            try:
                async with asyncio.timeout(slot.entry.timeout):
                    await slot.policy.commit(txn, outcome)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("policy %s failed to commit txn %s", slot.entry.id, txn.txn_id)
                if self.observer:
                    self.observer.policy_error(slot.entry.id)

    # ---- helpers ----------------------------------------------------------------------

    @staticmethod
    def _applies(slot: _Slot, message_class: str | None) -> bool:
        return slot.all_classes or (message_class is not None and message_class in slot.entry.classes)

    async def _deferred_recipients(
        self, decision: StageDecision, slot: _Slot, txn: Transaction, recipients: list[str]
    ) -> bool:
        """Per-recipient checks that could not run at RCPT time, after DATA. When some
        recipients remain, those refused for good are ``held`` (the others get the message);
        otherwise the refusals become one reply that names the recipients."""
        refused: list[tuple[str, PolicyResult]] = []
        for recipient in recipients:
            before = len(decision.results)
            await self._record(
                decision,
                slot,
                txn,
                "rcpt",
                functools.partial(slot.policy.check_rcpt, txn, recipient),
                recipient,
                stop_on_refusal=False,
            )
            for result in decision.results[before:]:
                if result.action is not Action.ACCEPT and result.mode == "enforce":
                    refused.append((recipient, result))
        if not refused or not decision.accepted:
            return False
        still = [r for r in txn.recipients if r not in decision.held and r not in {n for n, _ in refused}]
        if still and all(result.action is Action.REJECT for _, result in refused):
            # Some recipients may have the message: they get it (one copy each), the others
            # are refused and reported to the sender.
            for recipient, result in refused:
                assert result.reply is not None
                decision.held[recipient] = result.reply
            return False
        temporary = all(r.action is Action.TEMPFAIL for _, r in refused)
        first = refused[0][1].reply
        assert first is not None
        names = ", ".join(recipient for recipient, _ in refused[:10])
        more = f" and {len(refused) - 10} more" if len(refused) > 10 else ""
        text = f"{first.text} (recipients: {names}{more})"
        if temporary:
            decision.action, decision.reply = Action.TEMPFAIL, Reply(first.code, first.status, text)
        else:
            reject = next(r.reply for _, r in refused if r.action is Action.REJECT)
            assert reject is not None
            decision.action = Action.REJECT
            decision.reply = Reply(reject.code, reject.status, f"{reject.text} (recipients: {names}{more})")
        if self.exhaustive:
            first_index = decision.results.index(refused[0][1])
            decision.results[first_index] = dataclasses.replace(refused[0][1], decided=True)
            return False
        return True

    async def _record(
        self,
        decision: StageDecision,
        slot: _Slot,
        txn: Transaction,
        stage: str,
        call: Callable[[], Awaitable[Verdict | None]],
        recipient: str | None = None,
        *,
        stop_on_refusal: bool = True,
    ) -> bool:
        """Run one check, record its result; True when the stage must stop here."""
        entry = slot.entry
        started = time.perf_counter()
        error = False
        try:
            # asyncio.timeout, not wait_for: the check runs in this task, not in a new one.
            async with asyncio.timeout(entry.timeout):
                verdict = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = True
            what = "timed out" if isinstance(exc, TimeoutError) else f"failed: {type(exc).__name__}: {exc}"
            log.error(
                "policy %s %s (txn %s, stage %s)",
                entry.id,
                what,
                txn.txn_id,
                stage,
                exc_info=not isinstance(exc, TimeoutError),
            )
            if self.observer:
                self.observer.policy_error(entry.id)
            if entry.on_error == "tempfail":
                reply = r451_policy_error(txn.txn_id)
                verdict = Verdict(Action.TEMPFAIL, f"policy {what}", reply)
            else:
                verdict = Verdict.accept(f"policy {what}; on_error: accept")
        duration = time.perf_counter() - started
        if verdict is None:
            return False
        result = PolicyResult(
            policy=entry.id,
            stage=stage,
            action=verdict.action,
            mode=entry.mode,
            reason=verdict.reason,
            reply=_with_class_note(verdict.reply, slot, txn),
            evidence=verdict.evidence,
            recipient=recipient,
            error=error,
            duration=duration,
        )
        decision.results.append(result)
        if self.observer:
            self.observer.policy_verdict(entry.id, "error" if error else str(verdict.action), entry.mode, duration)
        if entry.mode == "monitor":
            if verdict.action is not Action.ACCEPT:
                log.info(
                    "policy %s (monitor) would %s txn %s: %s", entry.id, verdict.action, txn.txn_id, verdict.reason
                )
            return False
        if verdict.action is Action.ACCEPT:
            if verdict.edit is not None:
                decision.edits.append(verdict.edit)
            return False
        if stop_on_refusal and decision.accepted:
            decision.action = verdict.action
            decision.reply = result.reply
            if self.exhaustive:
                decision.results[-1] = dataclasses.replace(result, decided=True)
                return False
            return True
        return False


#: RFC 5321 section 4.5.3.1.5: a reply line is at most 512 octets with its code and CRLF.
_REPLY_TEXT_LIMIT = 480


def _with_class_note(reply: Reply | None, slot: _Slot, txn: Transaction) -> Reply | None:
    """A refusal by a policy that applies to commercial mail only says why the message was
    judged commercial, so the sender can fix the message or dispute the class."""
    if reply is None or reply.is_success or not txn.class_note or "transactional" in slot.entry.classes:
        return reply
    room = _REPLY_TEXT_LIMIT - len(reply.text) - 3
    if room < 40:
        return reply
    note = txn.class_note if len(txn.class_note) <= room else txn.class_note[: room - 3] + "..."
    return Reply(reply.code, reply.status, f"{reply.text} ({note})")
