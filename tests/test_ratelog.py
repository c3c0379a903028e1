"""The log throttle (service/ratelog.py): the first line of a kind at once, then at most one
per interval with the count held back, and no count ever lost."""

from __future__ import annotations

import logging

import pytest

from service import ratelog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "test.ratelog"]


def test_held_back_lines_are_counted_in_the_next_line_of_their_kind(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = ratelog.Throttle(logging.getLogger("test.ratelog"), interval_s=10, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        for _ in range(4):
            throttle.log(logging.WARNING, "down", "backend down: %s", "UNAVAILABLE")
            clock.now += 1
        clock.now = 12
        throttle.log(logging.WARNING, "down", "backend down: %s", "UNAVAILABLE")
    assert lines(caplog) == ["backend down: UNAVAILABLE",
                             "backend down: UNAVAILABLE (and 3 more like it in the last 12 s)"]


def test_a_full_table_and_the_way_out_say_what_was_held_back(caplog: pytest.LogCaptureFixture) -> None:
    """Clearing the table at max_kinds dropped every other kind's count, and a burst that
    ended was never told (found by review)."""
    clock = Clock()
    throttle = ratelog.Throttle(logging.getLogger("test.ratelog"), interval_s=10, clock=clock, max_kinds=2)
    with caplog.at_level(logging.WARNING, logger="test.ratelog"):
        for _ in range(3):
            throttle.log(logging.WARNING, "a", "kind %s", "a")
        throttle.log(logging.WARNING, "b", "kind %s", "b")
        clock.now = 2
        throttle.log(logging.WARNING, "c", "kind %s", "c")  # a third kind: the table is full
        throttle.log(logging.WARNING, "c", "kind %s", "c")
        ratelog.flush_all()  # the gateway stops
        ratelog.flush_all()  # nothing left to say
    assert lines(caplog) == ["kind a", "kind b", "kind a (held back: 2 like it in the last 2 s)", "kind c",
                             "kind c (held back: 1 like it in the last 0 s)"]
