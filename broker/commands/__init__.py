"""What every fedmq command shares: TOML configuration with environment overrides, exit codes, logging."""
