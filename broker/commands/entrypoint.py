"""What every fedmq command shares: exit codes, ``--version`` and logging set-up (only entry points configure logging)."""

from __future__ import annotations

import argparse
import logging

from fedmq.broker import __version__

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2  # 2: usage or configuration error (systemd: do not restart)
EXIT_AUTH = 3  # the broker refused our credentials (revoked or wrong): restarting cannot help (systemd: do not restart)


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def add_version(parser: argparse.ArgumentParser) -> None:
    """``--version``: the one version, read from the installed distribution's metadata."""
    parser.add_argument("--version", action="version", version=f"%(prog)s (fedmq) {__version__}")
