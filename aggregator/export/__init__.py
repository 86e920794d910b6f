"""Keras model -> trainable TFLite artifact (the only part of fedmq that needs TensorFlow)."""
