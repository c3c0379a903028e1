"""handlers/wire.py: a ProbeBatch walked on the wire finds the items a protobuf parser finds,
bounds their count and their plans' bytes before anything is parsed, refuses what does not
walk, and walks a bounded number of fields whatever the bytes."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from handlers import wire
from robustgate.v1 import probe_pb2


def item(i: int, plan: bool = True, views: int = 1) -> probe_pb2.ProbeItem:
    out = probe_pb2.ProbeItem(tensor=probe_pb2.Tensor(shape=[28, 28], dtype="uint8", data=bytes([i % 256]) * 784))
    if plan:
        out.plan.CopyFrom(probe_pb2.ProbePlan(version=2, seed=2**40 + i, views=[probe_pb2.ViewTransform(rotate_deg=5)] * views,
                                              noise=probe_pb2.NoiseProbe(sigma=0.25, count=i)))
    return out


def varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(0x80 | n & 0x7F)
        n >>= 7
    return bytes(out + bytes([n]))


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_spans_are_the_items_a_parser_finds() -> None:
    """Items longer than the plan bound are walked inside and their plans measured; shorter
    ones (whose plan cannot be over it) are not."""
    items = [item(i, plan=i % 3 != 0, views=i) for i in range(40)]
    buf = probe_pb2.ProbeBatch(items=items).SerializeToString()
    for bound in (0, 1 << 20):
        spans = wire.batch_items(buf, 40, bound)
        assert len(spans) == 40 and not any(s.malformed for s in spans)
        for s, it in zip(spans, items):
            assert buf[s.start:s.end] == it.SerializeToString()
            measured = len(it.plan.SerializeToString()) if it.HasField("plan") else 0
            assert s.plan_bytes == (measured if bound == 0 else None)
    assert wire.batch_items(b"", 1, 0) == []


def test_the_walk_stops_one_item_past_the_limit() -> None:
    """Four million empty items (8 MiB, which TorchServe lets through) are refused at the
    third: what follows is never read (here, bytes that do not walk)."""
    empty = b"\x0a\x00"
    assert len(wire.batch_items(empty * 2, 2, 0)) == 2
    with pytest.raises(wire.TooManyItems):
        wire.batch_items(empty * 3 + b"\xff" * 64, 2, 0)
    with pytest.raises(wire.TooManyItems):
        wire.batch_items(empty * (4 << 20), 256, 0)


def test_the_fields_walked_are_bounded() -> None:
    """The walk is a Python step per field, and a field can be two bytes: 8 MiB of them would
    take about a second of the worker's. Fields beside the items, and fields inside one item,
    are capped; past the cap the batch, or the item, is refused."""
    other = b"\x10\x00"  # field 2, a varint: unknown to ProbeBatch
    one = field(1, item(1).SerializeToString())
    assert len(wire.batch_items(other * wire.MAX_OTHER_FIELDS + one, 4, 0)) == 1
    with pytest.raises(wire.WireError, match="fields beside the items"):
        wire.batch_items(other * (wire.MAX_OTHER_FIELDS + 1) + one + b"\xff", 4, 0)
    inner = b"\x18\x00"  # field 3 of an item: unknown
    assert not wire.batch_items(field(1, inner * wire.MAX_ITEM_FIELDS), 1, 0)[0].malformed
    (past,) = wire.batch_items(field(1, inner * (wire.MAX_ITEM_FIELDS + 1)), 1, 0)
    assert past.malformed
    (short,) = wire.batch_items(field(1, inner * (wire.MAX_ITEM_FIELDS + 1)), 1, 1 << 10)
    assert not short.malformed and short.plan_bytes is None  # within the plan bound: not walked


def test_a_plan_is_measured_summed_where_its_field_repeats() -> None:
    """A parser merges repeated ``plan`` fields into one plan: their bytes add up."""
    plan = probe_pb2.ProbePlan(views=[probe_pb2.ViewTransform()] * 1000).SerializeToString()
    one = probe_pb2.ProbeItem(plan=probe_pb2.ProbePlan.FromString(plan)).SerializeToString()
    assert wire.batch_items(field(1, one), 1, 0)[0].plan_bytes == len(plan)
    twice = one + one  # two plan fields in one item
    assert len(probe_pb2.ProbeItem.FromString(twice).plan.views) == 2000
    assert wire.batch_items(field(1, twice), 1, 0)[0].plan_bytes == 2 * len(plan)


@pytest.mark.parametrize("buf, why", [
    (b"\x0a", "truncated varint"),
    (b"\x0a\x05abc", "length past the end"),
    (b"\x0b\x0c", "a group"),
    (b"\x02\x00", "field number 0"),
    (varint(1 << 29 << 3) + b"\x00", "field number 2**29, past protobuf's largest"),
    (b"\x08\x01", "items as a varint"),
    (b"\x10" + b"\xff" * 10 + b"\x00", "an 11-byte varint, within the message"),
])
def test_bytes_that_do_not_walk_are_refused(buf: bytes, why: str) -> None:
    with pytest.raises(wire.WireError):
        wire.batch_items(buf, 8, 0)


def test_an_item_that_does_not_walk_is_marked_alone() -> None:
    good = item(1).SerializeToString()
    bad = b"\x12\x7f\x00"  # a plan of 127 bytes in an item of 3
    buf = b"".join(field(1, x) for x in (good, bad, good))
    assert [s.malformed for s in wire.batch_items(buf, 3, 0)] == [False, True, False]


def test_unknown_fields_are_skipped_as_a_parser_keeps_them() -> None:
    it = item(2).SerializeToString()
    unknown = b"\x10\x96\x01" + b"\x19" + bytes(8) + b"\x25" + bytes(4) + b"\x2a\x02hi"  # fields 2 to 5, every wire type
    buf = unknown + field(1, it) + unknown
    assert len(probe_pb2.ProbeBatch.FromString(buf).items) == 1
    (s,) = wire.batch_items(buf, 1, 0)
    assert buf[s.start:s.end] == it and not s.malformed


def test_where_the_walk_passes_the_parser_reads_the_same_items() -> None:
    """Mutated batches: whenever the walk passes and every item parses alone, the whole batch
    parses to the same items; whenever the whole batch does not parse, the walk or an item
    says so."""
    rng = random.Random(8)
    base = probe_pb2.ProbeBatch(items=[item(i, plan=i % 2 == 0, views=2) for i in range(5)]).SerializeToString()
    checked = 0
    for _ in range(3000):
        buf = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(buf))
            if rng.random() < 0.7:
                buf[pos] = rng.randrange(256)
            else:
                del buf[pos:pos + rng.randint(1, 40)]
        buf = bytes(buf)
        try:
            whole = probe_pb2.ProbeBatch.FromString(buf)
        except DecodeError:
            whole = None
        try:
            spans = wire.batch_items(buf, 16, 0)
            parsed = [None if s.malformed else probe_pb2.ProbeItem.FromString(buf[s.start:s.end]) for s in spans]
        except (wire.WireError, DecodeError):
            continue
        if None in parsed:
            continue
        checked += 1
        assert whole is not None and list(whole.items) == parsed
    assert checked > 100, checked
