"""Broker operations: provisioning (passwords, ACL, certificates), Mosquitto config, local launcher."""
