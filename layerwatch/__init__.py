"""layerwatch: watch a neural network learn.

Add :class:`LayerWatch` to ``model.fit`` to record every conv layer's
activations for fixed probes at every training step; render the recording
into GIFs with :func:`render` or ``layerwatch render``.
"""

from __future__ import annotations

from typing import Any

from .version import __version__

__all__ = ["LayerWatch", "one_per_class", "open_run", "read_run", "render", "drift", "health",
           "compare", "report", "show", "RecordingError", "__version__"]

# Functions named like their package are bound here eagerly: a lazy binding would
# be replaced by the subpackage itself as soon as anything imports it.
from .analysis.drift import drift  # noqa: E402
from .analysis.health import health  # noqa: E402
from .record.probes import one_per_class  # noqa: E402
from .rendering.compare import compare  # noqa: E402
from .rendering.run import render  # noqa: E402
from .report import report  # noqa: E402
from .store import RecordingError, open_run, read_run  # noqa: E402

# Importing Keras pulls in a backend (seconds); the reader, the renderer and the
# CLI do not need it, so the callback is imported on first use.
_LAZY = {
    "LayerWatch": ("layerwatch.record.callback", "LayerWatch"),
    "show": ("layerwatch.notebook", "show"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layerwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
