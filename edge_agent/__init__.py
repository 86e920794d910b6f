"""fedmq edge agent: trains the global model on local data with a TFLite interpreter (no TensorFlow)."""
