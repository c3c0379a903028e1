"""Log lines that repeat with every request, at most once per interval for each kind.

A backend outage or a deployment fault fails every request the same way; one log line per
request would be thousands a second, paid for by the log pipeline and the node's disk. The
metrics still count every request; the log says the first one at once, then at most one per
``interval_s`` for the same kind, with how many like it were held back in between. Nothing
held back goes unsaid: when the table of kinds is full, and when the gateway stops
(:func:`flush_all`), each kind with lines held back says how many.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Hashable

_ALL: weakref.WeakSet[Throttle] = weakref.WeakSet()


class Throttle:
    def __init__(self, logger: logging.Logger, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 256) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self.clock = clock
        self.max_kinds = max_kinds
        # kind -> (last logged, held back since, the last held line's level, msg and args)
        self._kinds: dict[Hashable, tuple[float, int, int, str, tuple[object, ...]]] = {}
        _ALL.add(self)

    def log(self, level: int, kind: Hashable, msg: str, *args: object) -> None:
        """``logger.log(level, msg, *args)`` unless ``kind`` was logged less than
        ``interval_s`` ago; then only counted, and the next line of that kind says how many."""
        now = self.clock()
        last, held, *_ = self._kinds.get(kind, (-math.inf, 0))
        if now - last < self.interval_s:
            self._kinds[kind] = (last, held + 1, level, msg, args)
            return
        if len(self._kinds) >= self.max_kinds and kind not in self._kinds:
            self.flush()  # bounded memory; at worst a kind is logged once more
        self._kinds[kind] = (now, 0, level, msg, args)
        if held:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, held, now - last)
        self.logger.log(level, msg, *args)

    def flush(self) -> None:
        """Say, for each kind with lines held back, how many (with the last of them), and
        forget every kind."""
        now = self.clock()
        kinds, self._kinds = self._kinds, {}
        for last, held, level, msg, args in kinds.values():
            if held:
                self.logger.log(level, msg + " (held back: %d like it in the last %.0f s)",
                                *args, held, now - last)


def flush_all() -> None:
    """:meth:`Throttle.flush` every throttle (the gateway's way out)."""
    for throttle in list(_ALL):
        throttle.flush()
