"""Notebook display: ``layerwatch.show("run.h5", "conv3")`` animates a layer inline.

The GIF is rendered in memory — drawn exactly as :func:`layerwatch.render.render`
draws it — and handed to IPython; no file is written.
"""

from __future__ import annotations

import io
import os
from typing import Any

from layerwatch.compare import _Panel, _SideBySide
from layerwatch.render import select_frames
from layerwatch.store import RecordingError, open_run


def layer_gif_bytes(path: str | os.PathLike, layer: str, *, max_frames: int | None = 200,
                    fps: float = 10.0, scale: int = 2, max_channels: int | None = 32,
                    value_range: tuple[float, float] | None = None) -> bytes:
    """One layer's animation as GIF bytes, rendered in memory (nothing written to disk).

    Parameters are those of :func:`show`.

    Returns
    -------
    bytes
        A complete animated GIF.

    Raises
    ------
    layerwatch.store.RecordingError
        The file is missing, foreign, damaged or holds no snapshot.
    ValueError
        Unknown layer or a bad option.
    """
    if isinstance(scale, bool) or not (isinstance(scale, int) and 1 <= scale <= 16):
        raise ValueError(f"scale must be an integer from 1 to 16. Received: scale={scale!r}")
    if max_frames is not None and (isinstance(max_frames, bool) or not (
            isinstance(max_frames, int) and max_frames >= 2)):
        raise ValueError("max_frames must be an integer >= 2 (first and last frames are always "
                         f"kept), or None for all. Received: max_frames={max_frames!r}")
    if not (isinstance(fps, (int, float)) and 0 < fps <= 50):
        raise ValueError(f"fps must be a number in (0, 50]. Received: fps={fps!r}")
    with open_run(path) as run:
        n = run.num_snapshots
        if n == 0:
            raise RecordingError(f"{run.path} holds no snapshot yet: nothing to show.")
        try:
            info = run.layer(layer)
        except KeyError:
            known = ", ".join(item.layer_name or item.key for item in run.layers)
            raise ValueError(f"The recording has no layer {layer!r}. Recorded layers: "
                             f"{known}.") from None
        steps, epochs = run.steps, run.epochs
        sample = (f"step {steps.max(initial=0)}  epoch {epochs.max(initial=0) + 1}"
                  f"  {info.layer_name or info.key}")
        panel = _Panel(run, info, None, scale=scale, max_channels=max_channels,
                       value_range=value_range, caption_sample=sample)
        chosen = steps[select_frames(n, max_frames=max_frames)]
        buffer = io.BytesIO()
        _SideBySide([panel], scale).write_gif(buffer, chosen.tolist(), fps=fps)
        return buffer.getvalue()


def show(path: str | os.PathLike, layer: str, *, max_frames: int | None = 200,
         fps: float = 10.0, scale: int = 2, max_channels: int | None = 32,
         value_range: tuple[float, float] | None = None) -> Any:
    """Display one layer's animation inline in Jupyter.

    Parameters
    ----------
    path
        A layerwatch recording.
    layer
        The layer's key or name, e.g. ``"conv3"``.
    max_frames
        At most this many frames (evenly spaced; first and last kept), so the
        notebook stays light; ``None`` shows every snapshot.
    fps
        Frames per second.
    scale
        Integer pixel zoom.
    max_channels
        Draw at most this many channels; ``None`` draws all.
    value_range
        Colour range ``(low, high)``; default as in :func:`layerwatch.render.render`.

    Returns
    -------
    IPython.display.Image
        The animated GIF; Jupyter displays it when it is a cell's last value.

    Raises
    ------
    ImportError
        IPython is not installed (``pip install ipython``).
    layerwatch.store.RecordingError
        The file is missing, foreign, damaged or holds no snapshot.
    ValueError
        Unknown layer or a bad option.

    Examples
    --------
    >>> import layerwatch
    >>> layerwatch.show("runs/mnist.h5", "conv3")   # doctest: +SKIP
    <IPython.core.display.Image object>
    """
    try:
        from IPython.display import Image
    except ImportError:
        raise ImportError("layerwatch.show displays in Jupyter/IPython, which is not installed. "
                          "Install it with: pip install ipython (or use layerwatch.render to "
                          "write GIF files).") from None
    return Image(data=layer_gif_bytes(path, layer, max_frames=max_frames, fps=fps, scale=scale,
                                      max_channels=max_channels, value_range=value_range),
                 format="gif")
