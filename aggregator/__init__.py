"""fedmq."""
