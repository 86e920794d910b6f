"""``fedmq-aggregator``: the server side of fedmq.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from fedmq.broker.commands.entrypoint import EXIT_AUTH, EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_version, configure_logging
from fedmq.broker.commands.extras import require_installed
from fedmq.broker.errors import AuthError, ConfigError, FedmqError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmq-aggregator", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("strategies", help="list aggregation strategies and their defaults",
                       description="List the strategy presets usable as [strategy] name = ...")
    s.add_argument("--check", metavar="TOML", help="validate the [strategy] table of a config file")
    r = sub.add_parser("run", help="serve rounds until the configured stop condition",
                       description="Run the aggregator service (see docs/configuration.md).")
    r.add_argument("--config", required=True, help="aggregator TOML file")
    r.add_argument("--max-seconds", type=float, help="stop after this many seconds (testing)")
    r.add_argument("--switch-strategy", action="store_true",
                   help="allow a restart with another [strategy] than the checkpoint's (its state starts fresh; "
                        "recorded in the history)")
    r.add_argument("--check", action="store_true",
                   help="validate what run needs (config, state_dir, model source, eval data) and exit; 2 = a problem")
    st = sub.add_parser("status", help="the fleet table and the round in progress (text or JSON)",
                        description="Ask the running aggregator (its [service] http_port) for the fleet table; "
                                    "with no service answering, show what the last one left in its state_dir.")
    st.add_argument("--config", required=True, help="aggregator TOML file")
    st.add_argument("--json", action="store_true", help="print {source, status, fleet} as JSON")
    st.add_argument("--state", choices=("online", "offline", "idle", "training", "error", "excluded"),
                    help="only devices in this state")
    st.add_argument("--filter", default="", metavar="TEXT", help="only devices whose id contains TEXT")
    st.add_argument("--limit", type=int, default=100_000, help="at most this many devices")
    sm = sub.add_parser("simulate", help="run a whole fleet on this machine (broker, aggregator, N agents)",
                        description="Simulate a fleet with real processes, a real broker and TFLite training.")
    from .simulate import add_arguments

    add_arguments(sm)
    e = sub.add_parser("export", help="export a Keras model to a verified trainable .tflite artifact",
                       description="Build, convert and verify a trainable TFLite artifact (builtins only).")
    e.add_argument("--model", required=True, help="zoo:NAME (mlp, 2nn, cnn, sensor1d) or package.module:function")
    e.add_argument("--batch-size", type=int, default=32, help="fixed training batch size (default 32)")
    e.add_argument("--optimizer", default="sgd", choices=["sgd", "momentum", "adam"])
    e.add_argument("--prox", action="store_true",
                   help="include the FedProx term (train takes mu; one more model-size buffer on the device)")
    e.add_argument("--verify-steps", type=int, default=20, help="TF vs TFLite parity steps (default 20)")
    e.add_argument("--out", required=True, help="output .tflite path (a .json manifest is written beside it)")
    return p


def _require(command: str, *modules: str) -> None:
    """Exit 2 with ``pip install 'fedmq[aggregator]'`` before a command that needs what it brings."""
    for m in modules:
        require_installed(m, "aggregator", f"fedmq-aggregator {command}", package=m.replace("_", "-"))


def cmd_export(args: argparse.Namespace) -> int:
    _require("export", "tensorflow", "keras")
    import json
    from pathlib import Path

    from .export.convert import ExportError, ModelRefused, export_model, load_model_fn
    from .export.trainable import TrainSpec

    try:
        model = load_model_fn(args.model)()
        ex = export_model(model, TrainSpec(batch_size=args.batch_size, optimizer=args.optimizer, prox=args.prox),
                          verify_steps=args.verify_steps)
    except ModelRefused as e:  # the model as given cannot be served: a usage error (exit 2)
        print(f"fedmq-aggregator export: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ExportError, ValueError) as e:
        print(f"fedmq-aggregator export: {e}", file=sys.stderr)
        return EXIT_FAIL
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(ex.artifact)
    meta = {"model_id": ex.model_id, "names": ex.names, "batch_size": ex.spec.batch_size,
            "optimizer": ex.spec.optimizer, "prox": ex.spec.prox, "weights": [w.to_wire() for w in ex.weights],
            "inputs": [i.to_wire() for i in ex.inputs], "verification": ex.verification}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    n = sum(int(np.prod(w.shape)) for w in ex.weights)
    print(f"{out}: {len(ex.artifact):,} bytes, {n:,} parameters, model id {ex.model_id[:16]}..., "
          f"verified ({ex.verification})")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    _require("run", "prometheus_client", "tensorflow", "keras")  # keras/TF export the model when not cached
    import signal

    from fedmq.broker.commands.config import redact

    from .config import load_config

    cfg = load_config(args.config)
    log = logging.getLogger("fedmq.aggregator")
    log.info("config: %s", redact(cfg))
    if args.check:
        problems = preflight(cfg)
        for p in problems:
            print(f"fedmq-aggregator: config error: {p}", file=sys.stderr)
        if problems:
            return EXIT_USAGE
        print(f"{args.config}: ok (model {cfg.model.source}, state in {cfg.service.state_dir}"
              + (f", eval on {cfg.eval.dataset}" if cfg.eval.dataset else "") + ")")
        return EXIT_OK
    from .service import AggregatorService

    svc = AggregatorService(cfg, switch_strategy=args.switch_strategy)
    signal.signal(signal.SIGTERM, lambda *_: svc.stop())
    signal.signal(signal.SIGINT, lambda *_: svc.stop())
    summary = svc.run(args.max_seconds)
    last = summary.history[-1] if summary.history else {}
    print(f"done: {summary.rounds_done} rounds, global model of round {summary.global_round}"
          + (f", eval accuracy {last['eval_accuracy']:.4f}" if "eval_accuracy" in last else ""))
    return EXIT_OK


def preflight(cfg) -> list[str]:
    """What ``run`` will need, checked without connecting: one message (naming the fix) per problem.

    The state directory is writable, the model source imports and names a function, the
    ``[eval]`` data loads. (Quorum against the agent list is checked when the config loads.)
    """
    from fedmq.broker.commands.config import check_writable_dir

    from .service import load_eval

    problems: list[str] = []
    for check in (lambda: check_writable_dir(cfg.service.state_dir, "service.state_dir"),
                  lambda: check_model_source(cfg.model.source),
                  lambda: _check_eval(cfg, load_eval)):
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    return problems


def _check_eval(cfg, load_eval) -> None:
    try:
        load_eval(cfg)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file may raise anything
        raise ConfigError(f"eval.dataset = {cfg.eval.dataset!r} cannot be loaded: {type(e).__name__}: {e}") from None


def check_model_source(source: str) -> None:
    """ConfigError unless ``zoo:NAME`` names a zoo model or ``package.module:function`` imports."""
    import importlib

    mod, _, fn = source.rpartition(":")
    key = f"model.source = {source!r}"
    if mod == "zoo":
        from .export.zoo import ZOO

        if fn not in ZOO:
            raise ConfigError(f"{key}: no zoo model {fn!r}; available: {', '.join(ZOO)}")
        return
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        missing = e.name or mod
        if mod == missing or mod.startswith(missing + "."):
            top = mod.split(".")[0]
            raise ConfigError(
                f"{key}: module {mod!r} is not importable (no module named {missing!r}); fedmq-aggregator does "
                f"not look in the current directory. Make it importable: put the directory that holds {top}/ "
                f"(or {top}.py) on PYTHONPATH, e.g. PYTHONPATH=/path/to/project fedmq-aggregator run ..., or "
                f"pip install -e the project that contains it") from None
        raise ConfigError(f"{key}: importing {mod!r} failed, it needs {missing!r}: install it (pip install ...)") \
            from None
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything at import time
        raise ConfigError(f"{key}: importing {mod!r} failed: {type(e).__name__}: {e}") from None
    if not callable(getattr(module, fn, None)):
        funcs = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))[:10]
        raise ConfigError(f"{key}: module {mod!r} has no function {fn!r}"
                          + (f"; it has: {', '.join(funcs)}" if funcs else ""))


def cmd_simulate(args: argparse.Namespace) -> int:
    _require("simulate", "prometheus_client", "tensorflow", "keras", "tqdm", "matplotlib")
    from .simulate import Simulation, from_args, print_summary

    cfg, run_dir = from_args(args)
    try:
        summary = Simulation(cfg, run_dir, progress=not args.no_progress).run()
    except KeyboardInterrupt:
        print("interrupted: every process was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"fedmq-aggregator simulate: {e}", file=sys.stderr)
        return EXIT_FAIL
    print_summary(summary)
    print(f"  run directory: {run_dir}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 with the table; 1 when neither a service nor a state dir has one; 2 on a config error."""
    import json
    from pathlib import Path

    from .config import load_config
    from .status_view import fetch, format_text, from_state_dir

    cfg = load_config(args.config)
    port = cfg.service.http_port or cfg.service.prometheus_port
    doc = None
    why = "[service] http_port is 0"
    if port:
        try:
            doc = fetch(cfg.service.http_addr or cfg.service.prometheus_addr, port, args.state or "", args.filter,
                        args.limit)
        except (OSError, ValueError) as e:
            why = f"no service answers on port {port} ({e})"
    if doc is None:
        doc = from_state_dir(Path(cfg.service.state_dir), args.state or "", args.filter, args.limit)
        if doc is None:
            print(f"fedmq-aggregator status: {why}, and {cfg.service.state_dir} holds no fleet.json yet",
                  file=sys.stderr)
            return EXIT_FAIL
        if not args.json:
            print(f"({why}: showing the state the last service left)")
    print(json.dumps(doc, indent=2) if args.json else format_text(doc))
    return EXIT_OK


def cmd_strategies(args: argparse.Namespace) -> int:
    from .strategies import PRESETS, build_strategy

    if args.check:
        from fedmq.broker.commands.config import load_toml

        table = load_toml(args.check).get("strategy")
        strat = build_strategy(table)
        print(f"{args.check}: [strategy] ok ({strat.name}, server optimizer {strat.server.name})")
        return EXIT_OK
    width = max(len(n) for n in PRESETS)
    for name, preset in PRESETS.items():
        extra = {k: v for k, v in preset.items() if k != "doc"}
        print(f"{name:<{width}}  {preset['doc']}\n{'':<{width}}  defaults: {extra}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return {"strategies": cmd_strategies, "export": cmd_export, "run": cmd_run,
                "simulate": cmd_simulate, "status": cmd_status}[args.cmd](args)
    except ConfigError as e:
        print(f"fedmq-aggregator: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AuthError as e:  # refused credentials: restarting cannot help (systemd: RestartPreventExitStatus=3)
        print(f"fedmq-aggregator: credentials refused: {e}", file=sys.stderr)
        return EXIT_AUTH
    except FedmqError as e:
        print(f"fedmq-aggregator: error: {e}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
