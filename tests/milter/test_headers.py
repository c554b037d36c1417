"""The milter's header actions: applied as an MTA applies them (smfi_chgheader by index
among a name's fields, smfi_insheader at the top), they make the MTA's header block into
the relay's final one; and a decision needing copies becomes a refusal, never a guess."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from policies.base import MessageEdit, Reply
from proxy import replies as R
from proxy.milter.headers import Field, HeaderAction, header_actions, join_fields, split_fields
from proxy.relay.delivery import as_one_message
from proxy.relay.pipeline import StageDecision


def apply(fields: list[Field], actions: list[HeaderAction]) -> list[Field]:
    """What Postfix's cleanup does with the actions, in their order."""
    out = list(fields)
    for action in actions:
        if action.kind == "insert":
            out.insert(0, (action.name, action.value or ""))
            continue
        seen = 0
        for position, (name, _) in enumerate(out):
            if name.lower() == action.name.lower():
                seen += 1
                if seen == action.index:
                    del out[position]
                    break
        else:
            raise AssertionError(f"no field {action.name} #{action.index}")
    return out


def test_split_and_join_keep_folds_and_leading_space() -> None:
    head = b"Subject: one\r\n two\r\nX-Odd:no-space\r\nTo: a@example.org\r\n"
    fields = split_fields(head + b"\r\nbody\r\n")
    assert fields == [("Subject", " one\r\n two"), ("X-Odd", "no-space"), ("To", " a@example.org")]
    assert join_fields(fields) == head


def test_the_relays_edits_become_deletions_and_insertions() -> None:
    before = [("Received", " x"), ("From", " a"), ("Bcc", " b1"), ("To", " t"), ("Bcc", " b2"), ("X-Topic", " n")]
    added = [("DKIM-Signature", " v=1"), ("Received", " ours"), ("List-Unsubscribe", " <u>")]
    after = [*added, before[0], before[1], before[3]]
    actions = header_actions(before, after)
    assert actions is not None
    assert [(a.kind, a.name, a.index) for a in actions[:3]] == [
        ("change", "X-Topic", 1),
        ("change", "Bcc", 2),  # the last one first: indexes stay right either way
        ("change", "Bcc", 1),
    ]
    assert apply(before, actions) == after


names = st.sampled_from(["From", "To", "Bcc", "Received", "Subject", "List-Unsubscribe"])
fields_strategy = st.lists(st.tuples(names, st.sampled_from([" a", " b", " c"])), max_size=8)


@given(fields_strategy, st.data())
def test_any_removal_and_prefix_round_trips(before: list[Field], data: st.DataObject) -> None:
    kept = [field for field in before if data.draw(st.booleans())]
    added = data.draw(fields_strategy)
    actions = header_actions(before, added + kept)
    assert actions is not None
    assert apply(before, actions) == added + kept


def test_held_recipients_refuse_the_one_message() -> None:
    refusal = Reply(550, "5.7.1", "no consent")
    decision = StageDecision(held={"bob@example.org": refusal})
    reply = as_one_message(decision, ["bob@example.org", "carol@example.org"])
    assert isinstance(reply, Reply)
    assert reply.line() == "550 5.7.1 no consent (recipients: bob@example.org)"


def test_personal_edits_apply_to_a_single_recipient_and_refuse_several() -> None:
    edit = MessageEdit(
        remove=("List-Unsubscribe",), per_recipient={"carol@example.org": (("List-Unsubscribe", "<u>"),)}
    )
    one = as_one_message(StageDecision(edits=[edit]), ["carol@example.org"])
    assert isinstance(one, StageDecision)
    assert one.edits == [MessageEdit(add=(("List-Unsubscribe", "<u>"),), remove=("List-Unsubscribe",))]
    assert as_one_message(StageDecision(edits=[edit]), ["carol@example.org", "d@example.org"]) == (
        R.R550_ONE_RECIPIENT_ONLY
    )
    assert as_one_message(StageDecision(edits=[MessageEdit(split_per_recipient=True)]), ["c@x.org"]) == (
        R.R554_ONE_MESSAGE_ONLY
    )
