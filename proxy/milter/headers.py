"""The header block as the MTA holds it, and the milter actions that turn it into ours.

The relay builds the outgoing message by removing fields and putting fields on top
(``delivery.apply_edits``, the Received field, DKIM-Signature). A milter cannot hand the MTA
a new message, only edit the one it holds (smfi_chgheader, smfi_insheader): so the final
header block is compared with the MTA's and the difference becomes those actions."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ("HeaderAction", "header_actions", "join_fields", "split_fields")

#: (name, value): the value as it follows the colon, its leading space and folds included
#: (the milter negotiates SMFIP_HDR_LEADSPC), with CRLF line ends.
Field = tuple[str, str]


def split_fields(head: bytes) -> list[Field]:
    """The fields of a header block (CRLF line ends; the blank line may follow)."""
    fields: list[Field] = []
    for line in head.decode("utf-8", "surrogateescape").split("\r\n"):
        if not line:
            break
        if line[0] in " \t" and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value}\r\n{line}")
            continue
        name, _, value = line.partition(":")
        fields.append((name, value))
    return fields


def join_fields(fields: list[Field]) -> bytes:
    return "".join(f"{name}:{value}\r\n" for name, value in fields).encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class HeaderAction:
    """``change``: smfi_chgheader(name, index, value), ``value`` None deletes the index-th
    field of that name (1-based); ``insert``: smfi_insheader(0, name, value)."""

    kind: str
    name: str
    value: str | None
    index: int = 0


def header_actions(before: list[Field], after: list[Field]) -> list[HeaderAction] | None:
    """The actions that make ``before`` into ``after``, where ``after`` is new fields on top
    of ``before`` less some fields; None when it is not (the caller must not guess).

    Deletions come first, each field by its index among its name's fields, last ones first,
    so that an MTA that renumbers after a deletion and one that does not read the same
    field; then the new fields, each inserted at the top, the lowest first."""
    j = len(after) - 1
    deleted: list[int] = []
    for i in range(len(before) - 1, -1, -1):
        name, value = before[i]
        if j >= 0 and after[j][0].lower() == name.lower() and after[j][1] == value:
            j -= 1
        else:
            deleted.append(i)
    added = after[: j + 1]
    if any(not name or name != name.strip() for name, _ in added):
        return None
    actions: list[HeaderAction] = []
    for i in deleted:  # from the bottom up
        name = before[i][0]
        index = sum(1 for other, _ in before[: i + 1] if other.lower() == name.lower())
        actions.append(HeaderAction("change", name, None, index))
    actions.extend(HeaderAction("insert", name, value) for name, value in reversed(added))
    return actions
