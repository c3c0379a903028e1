"""``python -m service``: run the gateway (flags and ROBUSTGATE_* variables, see --help)."""

from service import early_signal

if __name__ == "__main__":  # not where a test imports this module: its SIGTERM stays the default
    early_signal.install()  # before the imports, which take a while: a SIGTERM to PID 1 is not lost

import asyncio  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from service import settings as settings_mod  # noqa: E402
from service.server import StartFailed, serve  # noqa: E402
from service.workers import supervise  # noqa: E402

log = logging.getLogger("service")


def main(argv: list[str] | None = None) -> int:
    try:
        s = settings_mod.from_args(argv)
    except ValueError as e:  # a setting out of range or of the wrong kind: one line, no traceback
        print(f"python -m service: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s.seed_file and not Path(s.seed_file).exists():
        log.warning("seed_file %s is not there: this gateway drew its own probe key, so an image's "
                    "probes differ from other gateways'", s.seed_file)
    if s.workers > 1:  # this process supervises, the workers serve
        return supervise(s)
    try:
        asyncio.run(serve(s))
    except StartFailed as e:
        log.error("cannot start: %s", e)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before its drain handler was installed (loading, the first probe)
        return 128 + 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
