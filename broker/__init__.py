"""fedmq's shared side: the wire contract, the MQTT transport, command plumbing and broker operations.

``contract`` (topics, messages, tensors, codec, chunking) is all a compatible client needs;
``transport`` wraps paho-mqtt; ``commands`` holds configuration, exit codes and logging set-up;
``ops`` provisions and runs Mosquitto.
"""

from __future__ import annotations

#: the one place the version is written: pyproject.toml reads it ([tool.setuptools.dynamic]). A literal, not
#: importlib.metadata: that import costs every process ~1 MB (email, zipfile, csv), a device's agent included
__version__ = "0.2.0"
