"""A signature runner that resizes an input only when its shape changes.

The runners of LiteRT, tflite-runtime and TensorFlow call ``ResizeInputTensor`` for *every*
input on *every* call. On aarch64, LiteRT (ai-edge-litert 1.4-2.3) crashes in that call for the
0-d ``lr`` input of a training signature (an empty shape: a memset of 4n-4 bytes with n = 0;
bench/RESULTS.md, "aarch64 runtime self-test"), so the agent crash-looped. Resizing only what
changed avoids the call for ``lr`` altogether.

It also keeps inputs between calls (``feed``, ``invoke``, ``carry``): the trainer's weights and
optimizer state live in the ``train`` signature's own input tensors, and each step's outputs are
copied straight back into them (no numpy copy of the model per step; see trainer.py).
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
        self._out_index = dict(self._outputs)
        self._carry_pairs: dict[tuple[str, ...], list[tuple[int, int]]] = {}
        if self._w is None or self._sub is None or not isinstance(self._inputs, dict) or not self._outputs:
            log.debug("signature runner without the expected internals: using its own call")
            self._w = None
        else:
            # The tensors' current shapes, as the interpreter holds them: an input of the same shape
            # is never resized (the 0-d lr, a full batch), a new shape is (a short last eval batch).
            details = runner.get_input_details()
            self._shapes = {n: tuple(int(d) for d in details[n]["shape"]) for n in self._inputs}
            self._allocated = False
        self.generation = 0  # counts allocations: an allocation may move (and so lose) the inputs held
        self._held: dict[str, np.ndarray] = {}  # without the wrapper: inputs kept here,
        self._last: dict[str, np.ndarray] = {}  # and the last call's outputs

    def get_input_details(self) -> dict:
        return self.runner.get_input_details()

    def get_output_details(self) -> dict:
        return self.runner.get_output_details()

    def __call__(self, **kwargs: Any) -> dict[str, np.ndarray]:
        if self._w is None:
            return self.runner(**kwargs)
        if len(kwargs) != len(self._inputs):
            raise ValueError(f"signature takes {len(self._inputs)} inputs, {len(kwargs)} given")
        self.feed(**kwargs)
        self._w.Invoke(self._sub)
        return {name: self._w.GetTensor(index, self._sub) for name, index in self._outputs}

    # -- inputs held between calls --------------------------------------------------------------
    def feed(self, **kwargs: Any) -> None:
        """Set some inputs; the others keep their values, unless an input's new shape makes the
        interpreter allocate again (``generation`` then changes: set every held input again)."""
        if self._w is None:
            self._held.update({n: np.array(v) for n, v in kwargs.items()})
            return
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
        self._allocate()
        for name, value in kwargs.items():
            self._w.SetTensor(self._inputs[name], value, self._sub)

    def _allocate(self) -> None:
        if self._w is None:
            return
        if not self._allocated:
            self._w.AllocateTensors(self._sub)
            self._allocated = True
            self.generation += 1

    def invoke(self) -> None:
        """Run on the inputs held (all of them must have been fed since the last allocation)."""
        if self._w is None:
            self._last = self.runner(**self._held)
            return
        self._allocate()
        self._w.Invoke(self._sub)

    def output(self, name: str) -> np.ndarray:
        """A copy of an output of the last ``invoke``."""
        if self._w is None:
            return np.array(self._last[name])
        return self._w.GetTensor(self._out_index[name], self._sub)

    def held(self, name: str) -> np.ndarray:
        """A copy of the value an input holds."""
        if self._w is None:
            return np.array(self._held[name])
        return self._w.GetTensor(self._inputs[name], self._sub)

    def carry(self, names: list[str]) -> None:
        """Each output ``name`` of the last ``invoke`` becomes input ``name`` (tensor to tensor)."""
        if self._w is None:
            self._held.update({n: self._last[n] for n in names})
            return
        key = tuple(names)
        pairs = self._carry_pairs.get(key)
        if pairs is None:
            pairs = self._carry_pairs[key] = [(self._inputs[n], self._out_index[n]) for n in names]
        w, sub = self._w, self._sub
        for i, o in pairs:
            w.SetTensor(i, self._view(o), sub)

    def copy_inputs(self, other: "Signature", names: list[str]) -> None:
        """Input ``name`` of this signature takes the value input ``name`` of ``other`` holds."""
        if self._w is None or other._w is None:
            self.feed(**{n: other.held(n) for n in names})
            return
        self._allocate()
        for n in names:
            self._w.SetTensor(self._inputs[n], other._view(other._inputs[n]), self._sub)

    def _view(self, index: int) -> np.ndarray:
        """The tensor's buffer without a copy (used at once, never kept: an invoke may move it)."""
        try:
            return self._w.tensor(self._w, index, self._sub)
        except TypeError:  # a wrapper whose tensor() has no subgraph argument
            return self._w.GetTensor(index, self._sub)
