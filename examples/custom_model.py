"""An example of an operator-supplied model: ``[model] source = "examples.custom_model:small_cnn"``.

Build it from ``fedmq.aggregator.export.layers`` (builtin-safe relu, conv and pooling) and return
logits; fedmq exports it to a trainable TFLite artifact and verifies it before serving it.
"""

import keras

from fedmq.aggregator.export.layers import Conv2D, Dense, MaxPool2D


def small_cnn(num_classes: int = 10) -> keras.Model:
    inp = keras.Input((28, 28, 1))
    x = Conv2D(8, 3, activation="relu", name="conv")(inp)
    x = MaxPool2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = Dense(64, activation="relu", name="hidden")(x)
    return keras.Model(inp, Dense(num_classes, name="logits")(x), name="small_cnn")
