"""``fedmq-agent``: the device side of fedmq (no TensorFlow needed).

Exit codes: 0 success, 1 runtime failure (systemd restarts it), 2 usage or configuration error
(also: no usable global model for ``predict`` yet), 3 the broker refused the credentials. The
unit written by ``install-service`` does not restart on 2 or 3: restarting cannot fix either.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from fedmq.broker.commands.entrypoint import (
    EXIT_AUTH,
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    add_version,
    configure_logging,
)
from fedmq.broker.errors import AuthError, ConfigError, FedmqError

log = logging.getLogger("fedmq.agent")


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
    pr = sub.add_parser("predict", help="run the latest verified global model on local inputs",
                        description="Predict with the global model the agent last accepted (cache_dir/global.msgpack "
                                    "and its artifact), in the agent's TFLite interpreter. Exit 2 when there is no "
                                    "usable global model yet.")
    pr.add_argument("--config", required=True, help="the agent's TOML file (for cache_dir and the runtime)")
    pr.add_argument("--input", help="an .npz file with the inputs under key 'x' (n examples of the model's input "
                                    "shape); labels under 'y', if present, are scored")
    out = pr.add_mutually_exclusive_group()
    out.add_argument("--output", help="write labels, probabilities, run, round, model_id to this .npz")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of text lines")
    pr.add_argument("--serve", action="store_true",
                    help="keep serving: a local HTTP JSON endpoint (GET /v1/model, POST /v1/predict) that reloads "
                         "the weights only when the agent accepted a newer global")
    pr.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default 127.0.0.1; no auth)")
    pr.add_argument("--port", type=int, default=8765, help="--serve: port (default 8765; 0 = any free port)")
    s = sub.add_parser("install-service", help="write the systemd unit for this device",
                       description="Write the fedmq-agent systemd unit shipped in the package, with ExecStart= "
                                   "running this environment's fedmq-agent and CPUQuota= leaving one core free.")
    s.add_argument("--config", default="/etc/fedmq/agent.toml", help="the config ExecStart= passes (default "
                                                                     "%(default)s)")
    dest = s.add_mutually_exclusive_group()
    dest.add_argument("--output", default="/etc/systemd/system/fedmq-agent.service",
                      help="where to write the unit (default %(default)s)")
    dest.add_argument("--print", action="store_true", help="print the unit instead of writing it")
    s.add_argument("--cores", type=int, help="cores of the device (default: this machine's)")
    return p


def resolve_cache_dir(cfg) -> None:
    """A relative ``cache_dir`` is relative to systemd's ``$STATE_DIRECTORY`` when set (the unit's
    ``StateDirectory=fedmq``: /var/lib/fedmq), else to the working directory; made absolute here
    so every message names the real place."""
    p = Path(cfg.agent.cache_dir).expanduser()
    if not p.is_absolute():
        state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        p = (Path(state) if state else Path.cwd()) / p
    cfg.agent.cache_dir = str(p)


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

    def cache() -> None:
        check_writable_dir(cfg.agent.cache_dir, "agent.cache_dir")
        found.append(f"cache_dir {cfg.agent.cache_dir} writable")

    def runtime() -> None:
        found.append(f"runtime {interpreter_class(cfg.agent.runtime or None)[1]}")
        from .selftest import check_cached  # one training step of the cached model in a child process

        found.append(check_cached(cfg))

    for check in (data, cache, runtime):
        try:
            check()
        except ConfigError as e:
            problems.append(str(e))
    return problems, ", ".join(found)


def _install_service(args) -> int:
    from fedmq.broker.storage import atomic_write

    from .systemd import render

    text = render(args.config, args.cores)
    if args.print:
        sys.stdout.write(text)
        return EXIT_OK
    out = Path(args.output)
    try:
        atomic_write(out, text.encode(), mode=0o644)
    except OSError as e:
        raise ConfigError(f"cannot write {out}: {e.strerror or e} (run it with sudo, or use --output PATH / "
                          "--print)") from None
    print(f"wrote {out}")
    if not Path(args.config).exists():
        print(f"note: {args.config} does not exist yet: put the agent's config there", file=sys.stderr)
    try:
        import pwd

        pwd.getpwnam("fedmq")
    except (ImportError, KeyError):
        print("note: there is no user 'fedmq' (User= of the unit): sudo useradd --system --no-create-home "
              "--shell /usr/sbin/nologin fedmq", file=sys.stderr)
    print(f"next: sudo systemctl daemon-reload && sudo systemctl enable --now {out.stem}")
    return EXIT_OK


def _predict(cfg, args) -> int:
    import json

    import numpy as np

    from .local_model import LocalModel
    from .trainer import DataError

    xnnpack = False if cfg.agent.low_memory else None
    model = LocalModel(cfg.cache_dir, cfg.agent.runtime or None, cfg.agent.num_threads or None, xnnpack,
                       cfg.agent.trusted_keys or None)
    if args.serve:
        from .serve import serve

        signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_OK))  # SystemExit out of serve_forever
        try:
            model.refresh()
        except FedmqError as e:  # serve anyway: 503 until the agent has a usable global
            log.warning("%s", e)
        serve(model, args.host, args.port, ready=lambda url: print(f"serving predictions on {url}", flush=True))
        return EXIT_OK
    if not args.input:
        raise ConfigError("predict needs --input data.npz (or --serve)")
    try:
        z = np.load(args.input, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"--input {args.input}: cannot load it as .npz: {e}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ConfigError(f"--input {args.input} is not an .npz archive: save the inputs with np.savez(path, x=x)")
    with z:
        if "x" not in z.files:
            raise ConfigError(f"--input {args.input} has no array 'x' (it holds {', '.join(z.files) or 'nothing'})")
        try:
            x = z["x"]
            y = z["y"] if "y" in z.files else None
        except (OSError, ValueError) as e:
            raise ConfigError(f"--input {args.input}: {e}") from None
    model.refresh()
    try:
        p = model.predict(x)
    except DataError as e:
        raise ConfigError(f"--input {args.input}: {e}") from None
    accuracy = None
    if y is not None and np.shape(y) == p.labels.shape:
        accuracy = float(np.mean(p.labels == np.asarray(y)))
    summary = (f"{len(p.labels)} predictions with the global model of run {p.run} round {p.round} "
               f"(model {p.model_id[:12]}, {model.runtime})" + ("" if accuracy is None else f"; accuracy on y "
                                                                                            f"{accuracy:.4f}"))
    if args.output:
        np.savez(args.output, labels=p.labels, probabilities=p.probabilities, run=p.run, round=p.round,
                 model_id=p.model_id)
        print(f"{summary}; written to {args.output}")
    elif args.json:
        doc = {"run": p.run, "round": p.round, "model_id": p.model_id, "labels": p.labels.tolist(),
               "probabilities": p.probabilities.tolist()}
        if accuracy is not None:
            doc["accuracy"] = accuracy
        print(json.dumps(doc))
    else:
        print(summary, file=sys.stderr)
        for i, (label, probs) in enumerate(zip(p.labels, p.probabilities)):
            print(f"{i}\t{label}\t{probs[label]:.4f}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.cmd == "info":
            from .runtime import interpreter_class

            print(interpreter_class()[1])
            return EXIT_OK
        if args.cmd == "install-service":
            return _install_service(args)
        from fedmq.broker.commands.config import redact

        from .config import load_config

        cfg = load_config(args.config)
        relative = not Path(cfg.agent.cache_dir).expanduser().is_absolute()
        given = cfg.agent.cache_dir
        resolve_cache_dir(cfg)
        log.info("config: %s", redact(cfg))
        if args.cmd == "check" or getattr(args, "check", False):
            problems, summary = preflight(cfg)
            for p in problems:
                print(f"fedmq-agent: config error: {p}", file=sys.stderr)
            if problems:
                return EXIT_USAGE
            print(f"config ok: agent {cfg.agent.id}, {summary}")
            if relative and not os.environ.get("STATE_DIRECTORY"):
                print(f"note: cache_dir = {given!r} is relative: {cfg.agent.cache_dir} from this directory; under the "
                      f"systemd unit (StateDirectory=fedmq) it is /var/lib/fedmq/{given}: prefer an absolute path")
            return EXIT_OK
        if args.cmd == "predict":
            return _predict(cfg, args)
        from fedmq.broker.commands.config import check_writable_dir

        from .memory import limit_heap_growth
        from .runtime import interpreter_class
        from .service import AgentService

        interpreter_class(cfg.agent.runtime or None)  # no runtime: exit 2 with the pip line, before connecting
        check_writable_dir(cfg.agent.cache_dir, "agent.cache_dir")  # exit 2, not a traceback and a restart loop

        limit_heap_growth()  # process-wide: model-size buffers go back to the OS when freed
        from .selftest import enable as enable_selftest

        enable_selftest(cfg.cache_dir)  # each artifact: one training step in a child before a runtime is used
        svc = AgentService(cfg)
        signal.signal(signal.SIGTERM, lambda *_: svc.stop())
        signal.signal(signal.SIGINT, lambda *_: svc.stop())
        svc.run(args.max_seconds)
        return EXIT_OK
    except ConfigError as e:
        print(f"fedmq-agent: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except AuthError as e:
        print(f"fedmq-agent: the broker refused this device's credentials: {e}", file=sys.stderr)
        return EXIT_AUTH
    except FedmqError as e:
        from .local_model import GlobalRefused, ModelNotReady

        if isinstance(e, (ModelNotReady, GlobalRefused)):
            print(f"fedmq-agent: no usable model: {e}", file=sys.stderr)
            return EXIT_USAGE
        print(f"fedmq-agent: error: {e}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
