"""fedmq's shared side: the wire contract, the MQTT transport, command plumbing and broker operations.

``contract`` (topics, messages, tensors, codec, chunking) is all a compatible client needs;
``transport`` wraps paho-mqtt; ``commands`` holds configuration, exit codes and logging set-up;
``ops`` provisions and runs Mosquitto.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("fedmq")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
