"""``fedmq-agent``: the device side of fedmq (no TensorFlow needed).

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from fedmq.broker.commands.entrypoint import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_version, configure_logging
from fedmq.broker.errors import ConfigError, FedmqError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmq-agent", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="connect and take part in rounds until stopped",
                       description="Run the agent: train on local data when a round asks for it.")
    r.add_argument("--config", required=True, help="agent TOML file (see docs/configuration.md)")
    r.add_argument("--max-seconds", type=float, help="stop after this many seconds (testing)")
    r.add_argument("--check", action="store_true", help="same as the check command: validate and exit")
    c = sub.add_parser("check", help="validate the config and the local data, then exit",
                       description="Validate config, data source, cache_dir and TFLite runtime without connecting "
                                   "(exit 2 with the fix when something run needs is wrong).")
    c.add_argument("--config", required=True)
    sub.add_parser("info", help="show which TFLite runtime this device will use")
    return p


def preflight(cfg) -> tuple[list[str], str]:
    """What ``run`` will need, checked without connecting: (one message per problem, a summary).

    The data source loads (and holds examples), ``cache_dir`` is writable, a TFLite runtime imports.
    """
    from fedmq.broker.commands.config import check_writable_dir

    from .data import load_local
    from .runtime import interpreter_class

    problems: list[str] = []
    found: list[str] = []

    def data() -> None:
        try:
            x, y = load_local(cfg.data.source)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt file may raise anything
            raise ConfigError(f"data.source = {cfg.data.source!r} cannot be loaded: {type(e).__name__}: {e}") \
                from None
        if len(y) == 0 or len(x) != len(y):
            raise ConfigError(f"data.source = {cfg.data.source!r}: {len(x)} inputs and {len(y)} labels; it needs at "
                              "least one example and one label per input")
        found.append(f"{len(y)} examples of shape {tuple(x.shape[1:])}")

    def runtime() -> None:
        found.append(f"runtime {interpreter_class(cfg.agent.runtime or None)[1]}")

    for check in (data, lambda: check_writable_dir(cfg.agent.cache_dir, "agent.cache_dir"), runtime):
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    return problems, ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.cmd == "info":
            from .runtime import interpreter_class

            print(interpreter_class()[1])
            return EXIT_OK
        from fedmq.broker.commands.config import redact

        from .config import load_config

        cfg = load_config(args.config)
        logging.getLogger("fedmq.agent").info("config: %s", redact(cfg))
        if args.cmd == "check" or getattr(args, "check", False):
            problems, summary = preflight(cfg)
            for p in problems:
                print(f"fedmq-agent: config error: {p}", file=sys.stderr)
            if problems:
                return EXIT_USAGE
            print(f"config ok: agent {cfg.agent.id}, {summary}")
            return EXIT_OK
        from .memory import limit_heap_growth
        from .runtime import interpreter_class
        from .service import AgentService

        interpreter_class(cfg.agent.runtime or None)  # no runtime: exit 2 with the pip line, before connecting

        limit_heap_growth()  # process-wide: model-size buffers go back to the OS when freed
        svc = AgentService(cfg)
        signal.signal(signal.SIGTERM, lambda *_: svc.stop())
        signal.signal(signal.SIGINT, lambda *_: svc.stop())
        svc.run(args.max_seconds)
        return EXIT_OK
    except ConfigError as e:
        print(f"fedmq-agent: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except FedmqError as e:
        print(f"fedmq-agent: error: {e}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
