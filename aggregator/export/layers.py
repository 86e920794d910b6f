"""Keras layers whose training graphs convert to TFLite *builtin* ops only.

The lightweight interpreters (ai-edge-litert, tflite-runtime) have no Flex delegate, so every op
of the ``train`` signature, gradients included, must be a builtin. Stock Keras layers fail on
three gradients (see ../shared notes, measured): ReluGrad, Conv2DBackpropFilter, MaxPoolGrad.
These replacements compute the same functions with builtin-only gradients:

* ``relu``            — ``tf.maximum(x, 0)`` (its gradient is a Select, not ReluGrad)
* ``Conv2D``/``Conv1D`` — explicit padding + VALID ``conv2d`` with a custom gradient: input
  gradient by ``conv2d_transpose``, filter gradient by a ``conv2d`` of the transposed input
  with the transposed output gradient (batch used as channels)
* ``MaxPool2D``/``MaxPool1D`` — non-overlapping windows by reshape + ``reduce_max`` (rank <= 4)

Defaults follow Keras: ``Conv2D``/``Conv1D`` pad ``"valid"`` unless given ``padding="same"``
(before 2026-12 they silently defaulted to ``"same"``; the zoo models now say so explicitly).
What each layer supports, and how it differs from its Keras namesake, is in docs/models.md;
``fedmq.aggregator.export.plain.to_plain_keras`` maps every layer here to its stock Keras
equivalent (the final ``model.keras`` loads without fedmq).
"""

from __future__ import annotations

import keras
import tensorflow as tf


def relu(x):
    return tf.maximum(x, 0.0)


@tf.custom_gradient
def conv2d_valid(x, k):
    """Stride-1 VALID conv2d whose gradients are builtin convolutions."""
    y = tf.nn.conv2d(x, k, strides=1, padding="VALID")

    def grad(dy):
        dx = tf.nn.conv2d_transpose(dy, k, output_shape=tf.shape(x), strides=1, padding="VALID")
        xt = tf.transpose(x, [3, 1, 2, 0])  # [C, H, W, N]: batch becomes the channel axis
        dyt = tf.transpose(dy, [1, 2, 0, 3])  # [Ho, Wo, N, F]: a "filter" over the batch
        dk = tf.nn.conv2d(xt, dyt, strides=1, padding="VALID")  # [C, kh, kw, F]
        return dx, tf.transpose(dk, [1, 2, 0, 3])

    return y, grad


def _same_pads(k: int) -> tuple[int, int]:
    return (k - 1) // 2, k // 2


PADDINGS = ("valid", "same")


def _activation(name):
    """None, the builtin-safe relu, or a stock Keras activation by name (e.g. "tanh")."""
    if name is None or name == "linear":
        return None
    if name == "relu":
        return relu
    if not isinstance(name, str):
        raise ValueError(f"activation {name!r}: give a Keras activation name (e.g. 'relu', 'tanh') or None")
    return keras.activations.get(name)  # ValueError for an unknown name


@keras.saving.register_keras_serializable("fedmq")
class Conv2D(keras.layers.Layer):
    """2-D convolution, stride 1, square kernel, padding "valid" (Keras' default) or "same", optional activation."""

    def __init__(self, filters: int, kernel_size: int, padding: str = "valid", activation: str | None = None,
                 **kw) -> None:
        super().__init__(**kw)
        if isinstance(kernel_size, (tuple, list)):
            if len(set(kernel_size)) != 1:
                raise ValueError(f"kernel_size {kernel_size!r}: fedmq's {type(self).__name__} takes a square kernel")
            kernel_size = kernel_size[0]
        padding = padding.lower() if isinstance(padding, str) else padding
        if padding not in PADDINGS:
            raise ValueError(f"padding {padding!r}: use 'valid' (the default, as in Keras) or 'same'")
        self._act = _activation(activation)
        self.filters, self.kernel_size, self.padding, self.activation = (int(filters), int(kernel_size), padding,
                                                                         activation)

    def build(self, input_shape):
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(k, k, input_shape[-1], self.filters),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        if self.padding == "same":
            a, b = _same_pads(self.kernel_size)
            x = tf.pad(x, [[0, 0], [a, b], [a, b], [0, 0]])
        y = conv2d_valid(x, self.kernel) + self.bias
        return self._act(y) if self._act else y

    def get_config(self):
        return {**super().get_config(), "filters": self.filters, "kernel_size": self.kernel_size,
                "padding": self.padding, "activation": self.activation}


@keras.saving.register_keras_serializable("fedmq")
class Conv1D(Conv2D):
    """1-D convolution over [batch, steps, channels], as a 1 x k Conv2D."""

    def build(self, input_shape):
        k = self.kernel_size
        self.kernel = self.add_weight(name="kernel", shape=(1, k, input_shape[-1], self.filters),
                                      initializer="glorot_uniform")
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")

    def call(self, x):
        x = tf.expand_dims(x, 1)
        if self.padding == "same":
            a, b = _same_pads(self.kernel_size)
            x = tf.pad(x, [[0, 0], [0, 0], [a, b], [0, 0]])
        y = conv2d_valid(x, self.kernel) + self.bias
        y = tf.squeeze(y, 1)
        return self._act(y) if self._act else y


@keras.saving.register_keras_serializable("fedmq")
class MaxPool2D(keras.layers.Layer):
    """Non-overlapping 2x2 (pool x pool) max-pooling; input sides must divide by ``pool``."""

    def __init__(self, pool: int = 2, **kw) -> None:
        super().__init__(**kw)
        self.pool = pool

    def call(self, x):
        # Two rank-4 reshape + reduce_max steps (a single rank-6 reshape aborts tflite-runtime 2.14).
        p = self.pool
        _, h, w, c = x.shape
        y = tf.reduce_max(tf.reshape(x, [-1, w // p, p, c]), axis=2)  # pool along width: [N*H, W/p, C]
        y = tf.reduce_max(tf.reshape(y, [-1, p, (w // p) * c]), axis=1)  # pool along height
        return tf.reshape(y, [-1, h // p, w // p, c])

    def get_config(self):
        return {**super().get_config(), "pool": self.pool}


@keras.saving.register_keras_serializable("fedmq")
class MaxPool1D(MaxPool2D):
    def call(self, x):
        p = self.pool
        _, t, c = x.shape
        return tf.reduce_max(tf.reshape(x, [-1, t // p, p, c]), axis=2)


@keras.saving.register_keras_serializable("fedmq")
class Dense(keras.layers.Dense):
    """keras Dense whose "relu" is the builtin-safe one."""

    def __init__(self, units: int, activation=None, **kw) -> None:
        self._fedmq_relu = activation == "relu"
        super().__init__(units, activation=None if self._fedmq_relu else activation, **kw)

    def call(self, x):
        y = super().call(x)
        return relu(y) if self._fedmq_relu else y

    def get_config(self):
        cfg = super().get_config()
        if self._fedmq_relu:
            cfg["activation"] = "relu"
        return cfg
