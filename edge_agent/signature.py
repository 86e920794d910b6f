"""A signature runner that resizes an input only when its shape changes.

The runners of LiteRT, tflite-runtime and TensorFlow call ``ResizeInputTensor`` for *every*
input on *every* call. On aarch64, LiteRT (ai-edge-litert 1.4-2.3) crashes in that call for the
0-d ``lr`` input of a training signature (an empty shape: a memset of 4n-4 bytes with n = 0;
bench/RESULTS.md, "aarch64 runtime self-test"), so the agent crash-looped. Resizing only what
changed avoids the call for ``lr`` altogether.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class Signature:
    """Calls one signature of an interpreter: same inputs, outputs and errors as the runtime's own
    ``SignatureRunner.__call__``. Falls back to that call where the runner's wrapper is not
    there (an unknown runtime version)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._w = getattr(runner, "_interpreter_wrapper", None)
        self._sub = getattr(runner, "_subgraph_index", None)
        self._inputs: dict[str, int] | None = getattr(runner, "_inputs", None)
        self._outputs = list(getattr(runner, "_outputs", ()) or ())
        if self._w is None or self._sub is None or not isinstance(self._inputs, dict) or not self._outputs:
            log.debug("signature runner without the expected internals: using its own call")
            self._w = None
        else:
            # The tensors' current shapes, as the interpreter holds them: an input of the same shape
            # is never resized (the 0-d lr, a full batch), a new shape is (a short last eval batch).
            details = runner.get_input_details()
            self._shapes = {n: tuple(int(d) for d in details[n]["shape"]) for n in self._inputs}
            self._allocated = False

    def get_input_details(self) -> dict:
        return self.runner.get_input_details()

    def get_output_details(self) -> dict:
        return self.runner.get_output_details()

    def __call__(self, **kwargs: Any) -> dict[str, np.ndarray]:
        if self._w is None:
            return self.runner(**kwargs)
        if len(kwargs) != len(self._inputs):
            raise ValueError(f"signature takes {len(self._inputs)} inputs, {len(kwargs)} given")
        changed = []
        for name, value in kwargs.items():
            if name not in self._inputs:  # every name checked before anything is resized
                raise ValueError(f"invalid input name ({name}) for the signature")
            shape = tuple(np.shape(value))
            if shape != self._shapes[name]:
                changed.append((name, shape))
        if changed:
            self._allocated = False  # until AllocateTensors succeeds: a failed one is retried by the next call
            for name, shape in changed:
                self._w.ResizeInputTensor(self._inputs[name], np.array(shape, dtype=np.int32), False, self._sub)
                self._shapes[name] = shape
        if not self._allocated:
            self._w.AllocateTensors(self._sub)
            self._allocated = True
        for name, value in kwargs.items():
            self._w.SetTensor(self._inputs[name], value, self._sub)
        self._w.Invoke(self._sub)
        return {name: self._w.GetTensor(index, self._sub) for name, index in self._outputs}
