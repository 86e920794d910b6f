"""An example of an operator-supplied model: ``[model] source = "examples.custom_model:small_cnn"``.

Build it from ``fedmq.aggregator.export.layers`` (builtin-safe relu, conv and pooling) and stock
Keras layers that train on-device (docs/models.md lists them), and return logits; fedmq exports
it to a trainable TFLite artifact and verifies it before serving it.

fedmq imports the module by name and does not look in the current directory: from the
repository root, put it on the path first:

    PYTHONPATH=. fedmq-aggregator export --model examples.custom_model:small_cnn --out /tmp/small_cnn.tflite
    PYTHONPATH=. fedmq-aggregator run --check --config my-aggregator.toml
"""

import keras

from fedmq.aggregator.export.layers import Conv2D, Dense, MaxPool2D


def small_cnn(num_classes: int = 10) -> keras.Model:
    inp = keras.Input((28, 28, 1))
    x = Conv2D(8, 3, padding="same", activation="relu", name="conv")(inp)
    x = MaxPool2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = Dense(64, activation="relu", name="hidden")(x)
    return keras.Model(inp, Dense(num_classes, name="logits")(x), name="small_cnn")
