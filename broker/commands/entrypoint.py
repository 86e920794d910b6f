"""What every fedmq command shares: exit codes and logging set-up (only entry points configure logging)."""

from __future__ import annotations

import logging

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # 2: usage or configuration error (systemd: do not restart)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
