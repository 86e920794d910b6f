"""``fedmq-broker``: provision a fleet's broker files, add, rotate or revoke one device, or run a local Mosquitto.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from fedmq.broker.commands.entrypoint import EXIT_FAIL, EXIT_OK, EXIT_USAGE, add_version, configure_logging
from fedmq.broker.commands.extras import require
from fedmq.broker.contract.topics import check_name
from fedmq.broker.errors import ConfigError, FedmqError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmq-broker", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_version(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("provision", help="generate passwords, ACL, CA/server/client certs and configs",
                        description="Generate every file a fleet needs (see docs/operations.md).")
    pr.add_argument("--fleet", required=True, help="fleet name ([a-z0-9-])")
    g = pr.add_mutually_exclusive_group(required=True)
    g.add_argument("--agents", help="comma-separated agent ids")
    g.add_argument("--count", type=int, help="number of agents, named agent-001...")
    pr.add_argument("--out", required=True, type=Path, help="output directory")
    pr.add_argument("--host", default="localhost", help="broker host name agents connect to")
    pr.add_argument("--port", type=int, default=8883, help="TLS listener port (default 8883)")
    pr.add_argument("--prefix", default="fedmq", help="topic prefix (default fedmq)")
    pr.add_argument("--broker-root", help="directory of the broker files on the broker host "
                    "(e.g. /mosquitto/config in Docker); default: OUT/broker")
    pr.add_argument("--max-packet-size", type=int, default=2_000_000, help="broker max_packet_size in bytes")
    pr.add_argument("--mutual-tls", action="store_true", help="require client certificates (CN = username)")
    pr.add_argument("--max-queued-messages", type=int, default=0,
                    help="Mosquitto per-client queue (default: sized for the aggregator of this fleet, max(10000, "
                         "50 x devices))")
    pr.add_argument("--max-inflight-messages", type=int, default=0,
                    help="Mosquitto per-client in-flight window (default: max(100, min(1000, devices / 10)))")
    pr.add_argument("--persistence", action="store_true",
                    help="turn Mosquitto persistence on (off by default: a crashed broker would restore a "
                         "snapshot up to autosave_interval old and serve a stale global; docs/protocol.md)")
    for name, what in [("add", "add one device to an existing fleet directory (new password, cert, agent.toml)"),
                       ("rotate", "new password and client certificate for one device (the old ones are refused)"),
                       ("revoke", "refuse one device from the next broker reload on (the rest of the fleet is "
                                  "untouched)")]:
        lc = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ". Changes the files of "
                            "this device only, then reloads the broker if told how (see docs/operations.md, "
                            "\"Device lifecycle\").")
        lc.add_argument("--fleet-dir", required=True, type=Path, help="the --out directory of `provision`")
        lc.add_argument("--agent", required=True, help="the device id ([a-z0-9-])")
        lc.add_argument("--ca-key", type=Path, help="the fleet's CA key if it is kept outside FLEET_DIR/ca/ca.key "
                        "(add, rotate; revoke under mutual TLS signs the CRL)")
        rl = lc.add_mutually_exclusive_group()
        rl.add_argument("--pid", type=int, help="SIGHUP this mosquitto process afterwards")
        rl.add_argument("--pidfile", type=Path, help="SIGHUP the mosquitto whose pid is in this file "
                        "(its pid_file setting)")
        rl.add_argument("--reload-command", metavar="CMD", help="run CMD afterwards, e.g. "
                        "'systemctl reload mosquitto' or 'docker kill -s HUP mosquitto' (no shell)")
        if name != "add":
            lc.add_argument("--broker", metavar="HOST:PORT", help="where this machine reaches the broker to mark "
                            "the device offline right before the reload (default: the fleet's host and port)")
            lc.add_argument("--no-mark-offline", action="store_true", help="reload without marking the device "
                            "offline (the aggregator then keeps asking it: a reload leaves no last will)")
    dv = sub.add_parser("devices", help="list a fleet's devices and their state",
                        description="Print the devices of a fleet directory (from its fleet.json).")
    dv.add_argument("--fleet-dir", required=True, type=Path, help="the --out directory of `provision`")
    dv.add_argument("--json", action="store_true", help="print JSON")
    rn = sub.add_parser("run", help="run a local Mosquitto in the foreground (development)",
                        description="Start Mosquitto with the project's config until Ctrl-C.")
    rn.add_argument("--port", type=int, default=1883)
    rn.add_argument("--host", default="127.0.0.1")
    rn.add_argument("--secure", type=Path, help="a provision output directory: TLS + passwords + ACL")
    rn.add_argument("--max-packet-size", type=int, default=0)
    rn.add_argument("--fleet-size", type=int, default=0,
                    help="size the per-client queue and in-flight window for a fleet of this many devices")
    rn.add_argument("--max-queued-messages", type=int, default=0, help="override the per-client queue")
    rn.add_argument("--max-inflight-messages", type=int, default=0, help="override the per-client in-flight window")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        if args.cmd == "provision":
            require("cryptography", "broker", "fedmq-broker provision")  # the certificates
            from fedmq.broker.ops.provision import ProvisionSpec, provision

            agents = ([a.strip() for a in args.agents.split(",") if a.strip()] if args.agents
                      else [f"agent-{i:03d}" for i in range(1, args.count + 1)])
            for a in agents:
                check_name(a)
            res = provision(ProvisionSpec(args.fleet, agents, args.out, args.host, args.port, args.prefix,
                                          broker_root=args.broker_root, max_packet_size=args.max_packet_size,
                                          mutual_tls=args.mutual_tls, persistence=args.persistence,
                                          max_queued_messages=args.max_queued_messages,
                                          max_inflight_messages=args.max_inflight_messages))
            print(f"provisioned fleet {args.fleet!r}: {len(agents)} agents + aggregator in {res.out_dir}")
            print(f"  broker:     {res.broker_dir}/mosquitto.conf (with passwd, acl, certs)")
            print(f"  aggregator: {res.out_dir}/aggregator/aggregator.toml")
            print(f"  agents:     {res.out_dir}/agents/<id>/agent.toml")
            return EXIT_OK
        if args.cmd in ("add", "rotate", "revoke", "devices"):
            require("cryptography", "broker", f"fedmq-broker {args.cmd}")
            return _lifecycle(args)
        from fedmq.broker.ops.launcher import LocalBroker, SecureFiles

        secure = None
        if args.secure:
            b = args.secure / "broker"
            secure = SecureFiles(str(b / "passwd"), str(b / "acl"), str(b / "ca.crt"), str(b / "server.crt"),
                                 str(b / "server.key"))
        broker = LocalBroker(secure, args.port, host=args.host, max_packet_size=args.max_packet_size,
                             persistence=False, fleet_size=args.fleet_size,
                             max_queued_messages=args.max_queued_messages,
                             max_inflight_messages=args.max_inflight_messages)
        if broker.embedded and not args.secure:
            require("amqtt.broker", "embedded", "without a mosquitto binary, fedmq-broker run")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        with broker:
            print(f"broker listening on {args.host}:{broker.port} (log: {broker.log_path}); Ctrl-C stops it")
            while not stop.wait(1.0):
                if broker.proc is None or broker.proc.poll() is not None:
                    print(broker.log(), file=sys.stderr)
                    return EXIT_FAIL
        return EXIT_OK
    except (FedmqError, ValueError) as e:
        print(f"fedmq-broker: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, (ValueError, ConfigError)) else EXIT_FAIL


def _lifecycle(args: argparse.Namespace) -> int:
    import json

    from fedmq.broker.ops import lifecycle

    if args.cmd == "devices":
        rows = lifecycle.manifest_summary(lifecycle.devices(args.fleet_dir))
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                when = r["revoked_at"] or r["rotated_at"] or r["added_at"] or "-"
                print(f"{r['id']:<32} {r['state']:<8} {when}")
        return EXIT_OK
    if args.pid is not None or args.pidfile is not None:
        lifecycle.broker_pid(pid=args.pid, pidfile=args.pidfile)  # a wrong target: refuse before changing files
    address = None
    if getattr(args, "broker", None):
        host, _, port_s = args.broker.rpartition(":")
        if not host or not port_s.isdigit():
            raise ValueError(f"--broker {args.broker!r}: expected HOST:PORT")
        address = (host.strip("[]"), int(port_s))
    op = {"add": lifecycle.add_device, "rotate": lifecycle.rotate_device, "revoke": lifecycle.revoke_device}
    ch = op[args.cmd](args.fleet_dir, args.agent, ca_key=args.ca_key)
    print(f"{args.cmd}: {ch.agent}")
    for p in ch.written:
        print(f"  wrote   {p}")
    for p in ch.removed:
        print(f"  removed {p}")
    for n in ch.notes:
        print(f"  note: {n}")
    if ch.password is not None:
        print(f"  copy {args.fleet_dir}/agents/{ch.agent}/ (agent.toml, client.crt, client.key, ca.crt) to the device")
    if ch.restart_needed:
        print("  RESTART the broker once (a reload is not enough this time)")
    if args.pid is None and args.pidfile is None and args.reload_command is None:
        print("  files written; the running broker still uses the old ones: reload it (SIGHUP), e.g. "
              "`systemctl reload mosquitto`, `docker kill -s HUP <container>` or `kill -HUP <pid>`")
        if ch.mark_offline:
            print("  note: a reload by hand leaves the device's retained status 'online' (no last will): the "
                  "aggregator keeps asking it; pass --pid, --pidfile or --reload-command to mark it offline first")
        return EXIT_OK

    def reload() -> str:
        return lifecycle.reload_broker(pid=args.pid, pidfile=args.pidfile, command=args.reload_command)

    rc = EXIT_OK
    try:
        if ch.mark_offline and not args.no_mark_offline:
            if address is None:
                m = lifecycle.devices(args.fleet_dir)
                address = (m.host, m.port)
            host, port = address
            try:
                print("  " + lifecycle.mark_offline(args.fleet_dir, ch, host, port, reload))
                return EXIT_OK
            except lifecycle.MarkOfflineError as e:
                print(f"fedmq-broker: warning: {e}; reloading anyway (the aggregator keeps asking the device "
                      "until its status says offline)", file=sys.stderr)
                rc = EXIT_FAIL
        print("  " + reload())
    except FedmqError as e:
        print(f"fedmq-broker: error: the files are written but the broker was not reloaded: {e}", file=sys.stderr)
        return EXIT_FAIL
    return rc


if __name__ == "__main__":
    sys.exit(main())
