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
    c = sub.add_parser("check", help="validate the config and the local data, then exit",
                       description="Validate config, data source and TFLite runtime without connecting.")
    c.add_argument("--config", required=True)
    sub.add_parser("info", help="show which TFLite runtime this device will use")
    return p


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
        if args.cmd == "check":
            from .data import load_local
            from .runtime import interpreter_class

            x, y = load_local(cfg.data.source)
            print(f"config ok: agent {cfg.agent.id}, {len(y)} examples of shape {x.shape[1:]}, "
                  f"runtime {interpreter_class(cfg.agent.runtime or None)[1]}")
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
