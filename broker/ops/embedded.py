"""An embedded pure-Python MQTT broker (amqtt), the launcher's fallback when Mosquitto is missing.

amqtt 0.12 speaks MQTT 3.1.1 only, enforces no ACL and is several times slower than Mosquitto:
fine for trying fedmq on a laptop, not for production. Run: ``python -m fedmq.broker.ops.embedded --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal


async def serve(host: str, port: int) -> None:
    from amqtt.broker import Broker  # optional dependency: pip install 'fedmq[embedded]'

    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 1000}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    broker = Broker(config)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedmq.broker.ops.embedded", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
