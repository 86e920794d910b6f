"""The MQTT transport: paho-mqtt client wrapper, receiving (decode, reassemble, dedupe) and publishing."""
