"""Update compression on the device, with error feedback for top-k.

Top-k alone throws away 99% of each delta; error feedback (Seide et al. 2014; Karimireddy et al.
2019) adds what was not sent to the next round's delta, so nothing is lost for good. The
residual is kept on disk so it survives restarts.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from fedmq.broker.contract.tensors import Compression, topk_count, topk_indices
from fedmq.broker.storage import atomic_write


class ErrorFeedback:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self, names: list[str], shapes: list[tuple]) -> dict[str, np.ndarray]:
        if self.path.is_file():
            with np.load(self.path) as z:
                if all(n in z.files and z[n].shape == s for n, s in zip(names, shapes)):
                    return {n: z[n] for n in names}
        return {n: np.zeros(s, np.float32) for n, s in zip(names, shapes)}

    def reset(self) -> None:
        """Forget the residual (a new run: another run's error would be fed into this one's updates)."""
        self.path.unlink(missing_ok=True)

    def save(self, residual: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **residual)
        atomic_write(self.path, buf.getbuffer())


def apply_error_feedback(delta: dict[str, np.ndarray], comp: Compression, ef: ErrorFeedback) -> dict[str, np.ndarray]:
    """For top-k: return delta + residual (to be sent through top-k) and store the new residual."""
    if comp.encoding != "topk":
        return delta
    names = list(delta)
    residual = ef.load(names, [delta[n].shape for n in names])
    corrected = {n: (delta[n] + residual[n]).astype(np.float32) for n in names}
    new_res = {}
    for n, v in corrected.items():
        flat = v.reshape(-1)
        k = topk_count(flat.size, comp.topk_fraction)
        keep = topk_indices(flat, k)  # the encoder's own selection: the residual is exactly what is not sent
        r = flat.copy()
        r[keep] = 0.0
        new_res[n] = r.reshape(v.shape)
    ef.save(new_res)
    return corrected
