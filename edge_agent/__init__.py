"""fedmq edge agent: trains the global model on local data with a TFLite interpreter (no TensorFlow).

``from fedmq.edge_agent import LocalModel`` runs the latest verified global model on the device
(see :mod:`fedmq.edge_agent.local_model`); it is imported on first use, so importing the package
stays light (no numpy, no interpreter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .local_model import GlobalRefused, LocalModel, ModelNotReady, Prediction

__all__ = ["GlobalRefused", "LocalModel", "ModelNotReady", "Prediction"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import local_model

        return getattr(local_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
