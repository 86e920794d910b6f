"""Models known to export and train on-device (each verified in tests/test_export.py).

Every model outputs logits; the artifact's ``infer`` applies softmax.
"""

from __future__ import annotations

import keras

from .layers import Conv1D, Conv2D, Dense, MaxPool2D


def mlp(input_dim: int = 64, num_classes: int = 10, hidden: tuple[int, ...] = (64, 32)) -> keras.Model:
    """A small MLP for feature vectors (e.g. scikit-learn's 8x8 digits as 64 features)."""
    inp = keras.Input((input_dim,))
    x = inp
    for i, h in enumerate(hidden):
        x = Dense(h, activation="relu", name=f"dense{i}")(x)
    return keras.Model(inp, Dense(num_classes, name="logits")(x), name="mlp")


def two_nn(input_dim: int = 784, num_classes: int = 10) -> keras.Model:
    """The FedAvg paper's 2NN: two 200-unit hidden layers with relu (199,210 parameters)."""
    return mlp(input_dim, num_classes, (200, 200))


def cnn(input_shape: tuple[int, int, int] = (28, 28, 1), num_classes: int = 10) -> keras.Model:
    """The FedAvg paper's CNN: 5x5 conv 32, 2x2 max-pool, 5x5 conv 64, 2x2 max-pool, dense 512, softmax."""
    inp = keras.Input(input_shape)
    x = Conv2D(32, 5, padding="same", activation="relu", name="conv1")(inp)
    x = MaxPool2D(2, name="pool1")(x)
    x = Conv2D(64, 5, padding="same", activation="relu", name="conv2")(x)
    x = MaxPool2D(2, name="pool2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = Dense(512, activation="relu", name="dense")(x)
    return keras.Model(inp, Dense(num_classes, name="logits")(x), name="cnn")


def sensor1d(steps: int = 100, channels: int = 6, num_classes: int = 7) -> keras.Model:
    """Compact 1-D conv net for sensor windows (the smartwatch data: 100 x 6, 7 classes)."""
    inp = keras.Input((steps, channels))
    x = Conv1D(16, 5, padding="same", activation="relu", name="conv1")(inp)
    x = Conv1D(32, 5, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling1D(name="gap")(x)
    return keras.Model(inp, Dense(num_classes, name="logits")(x), name="sensor1d")


ZOO = {"mlp": mlp, "2nn": two_nn, "cnn": cnn, "sensor1d": sensor1d}
