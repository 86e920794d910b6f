#!/bin/sh
# Copy the provisioned broker files where the config expects them, readable by the mosquitto user.
set -eu
mkdir -p /mosquitto/config
cp /fleet/broker/* /mosquitto/config/
chown -R mosquitto:mosquitto /mosquitto/config /mosquitto/data
chmod 0600 /mosquitto/config/passwd /mosquitto/config/server.key
exec /usr/sbin/mosquitto -c /mosquitto/config/mosquitto.conf
