"""fedmq aggregator: round control, aggregation strategies, model export, checkpoints, metrics, simulation."""
