"""A ``ProbeBatch`` read off the wire before it is parsed: where each item lies, how many there
are, and how many bytes each item's plan takes.

TorchServe bounds a request's bytes (``max_request_size``), not what parsing them builds: 8 MiB
of empty items, or one item whose plan is 8 MiB of empty views, parse to millions of messages
(~190 MB in the worker) before any count could be checked. :func:`batch_items` reads only tags
and lengths (the protobuf wire format: a varint key ``field << 3 | wire type``, then the value;
a length-delimited value is a varint length and that many bytes), stops one item past the
limit, and hands back each item's span so that the handler parses the items one by one, each
within its own bounds, and a bad item fails that item only.

The walk is bounded too, since it runs in Python (a step per field, where a field can be two
bytes): at most ``MAX_OTHER_FIELDS`` fields beside the items, and only an item longer than the
plan bound is walked inside (a shorter one cannot carry a plan over it), at most
``MAX_ITEM_FIELDS`` fields. The gateway writes items and, in each, a tensor and a plan.
"""

from __future__ import annotations

from typing import NamedTuple

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5
MAX_FIELD_NUMBER = (1 << 29) - 1
ITEMS = 1  # ProbeBatch.items
PLAN = 2  # ProbeItem.plan
MAX_OTHER_FIELDS = 64  # fields of a batch other than its items (fields a later schema may add)
MAX_ITEM_FIELDS = 64  # fields of one item walked (a tensor and a plan, and what a later schema adds)


class WireError(ValueError):
    """The bytes are not a protobuf message this module walks."""


class TooManyItems(ValueError):
    """More items than the limit (the walk stopped at the first one past it)."""


class ItemSpan(NamedTuple):
    """One ``items`` entry, ``buf[start:end]``. ``plan_bytes``: the length of its ``plan`` field
    (summed where the field repeats, as a parser merges them), measured where the item is longer
    than the plan bound; None where it is not (its plan is shorter than the item). ``malformed``:
    the item's own fields do not walk (truncated, a wire type protobuf 3 does not write, more
    than ``MAX_ITEM_FIELDS``)."""

    start: int
    end: int
    plan_bytes: int | None
    malformed: bool = False


def _varint(buf: bytes | memoryview, i: int, end: int) -> tuple[int, int]:
    """The varint at ``buf[i]`` and the index after it."""
    value = shift = 0
    while i < end:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            break
    raise WireError("a varint runs past its message or past 10 bytes")


def _field(buf: bytes | memoryview, i: int, end: int) -> tuple[int, int, int, int]:
    """The field at ``buf[i]``: (number, wire type, value start, next field's index); for a
    length-delimited field the value is ``buf[start:next]``. One-byte keys and lengths (nearly
    every one) skip the general varint reader."""
    key = buf[i]
    if key < 0x80:
        i += 1
    else:
        key, i = _varint(buf, i, end)
    number, kind = key >> 3, key & 7
    if not 0 < number <= MAX_FIELD_NUMBER:
        raise WireError(f"field number {number}")
    if kind == LEN:
        n = buf[i] if i < end else 0x80
        if n < 0x80:
            start = i + 1
        else:
            n, start = _varint(buf, i, end)
        i = start + n
    elif kind == VARINT:
        start = i
        _, i = _varint(buf, i, end)
    elif kind in (FIXED64, FIXED32):
        start = i
        i += 8 if kind == FIXED64 else 4
    else:  # groups (3, 4) are proto2's; 6 and 7 are not wire types
        raise WireError(f"wire type {kind}")
    if i > end:
        raise WireError("a field runs past its message")
    return number, kind, start, i


def _plan_bytes(buf: bytes | memoryview, i: int, end: int) -> int:
    total = fields = 0
    while i < end:
        fields += 1
        if fields > MAX_ITEM_FIELDS:
            raise WireError(f"more than {MAX_ITEM_FIELDS} fields in an item")
        number, kind, start, i = _field(buf, i, end)
        if number == PLAN and kind == LEN:
            total += i - start
    return total


def batch_items(buf: bytes | memoryview, max_items: int, max_plan_bytes: int) -> list[ItemSpan]:
    """Each ``items`` entry of the serialized ``ProbeBatch`` in ``buf``, in order. Raises
    :class:`TooManyItems` at item ``max_items + 1``, and :class:`WireError` where the batch's
    own fields do not walk or there are more than ``MAX_OTHER_FIELDS`` beside the items (an
    item's own fields that do not walk mark that item ``malformed``). Other top-level fields
    (unknown to this schema) are skipped, as a parser keeps them unread."""
    items: list[ItemSpan] = []
    i, end, others = 0, len(buf), 0
    while i < end:
        number, kind, start, i = _field(buf, i, end)
        if number != ITEMS:
            others += 1
            if others > MAX_OTHER_FIELDS:
                raise WireError(f"more than {MAX_OTHER_FIELDS} fields beside the items")
            continue
        if kind != LEN:
            raise WireError(f"field {ITEMS} (items) with wire type {kind}")
        if len(items) == max_items:
            raise TooManyItems(max_items)
        if i - start <= max_plan_bytes:
            items.append(ItemSpan(start, i, None))
            continue
        try:
            items.append(ItemSpan(start, i, _plan_bytes(buf, start, i)))
        except WireError:
            items.append(ItemSpan(start, i, None, malformed=True))
    return items
