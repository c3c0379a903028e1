"""A SIGTERM that arrives before the gateway's own handlers are installed.

The image's entrypoint ``exec``s the gateway, so it runs as PID 1 of its container, and the
kernel drops a signal sent to PID 1 whose action is the default: a pod deleted while its
gateway was still starting (imports, loading the models, the first probe of TorchServe, up to
``backend_timeout_s``) served on as if nothing had happened, until the kubelet's SIGKILL at the
end of the grace period, with no drain. ``python -m service`` records SIGTERM from its first
line (:func:`install`); whoever installs the real handler (:func:`service.server.serve`, the
supervisor) asks :func:`received` right after and stops at once (one process: once it listens,
with nothing in flight to drain; a supervisor: before it starts any worker). Outside PID 1 too
a SIGTERM during start is now such a stop, not a kill: one process goes on loading and probing
(up to ``backend_timeout_s``) first. A SIGTERM during the interpreter's own start, before this
module's first line, is still dropped by PID 1 (milliseconds).
"""

from __future__ import annotations

import signal

_received = False


def _record(signum: int, frame: object) -> None:
    global _received
    _received = True


def install() -> None:
    """Record SIGTERM until the real handler replaces this one."""
    signal.signal(signal.SIGTERM, _record)


def received() -> bool:
    """Whether SIGTERM arrived while :func:`install`'s handler was the one installed."""
    return _received
