"""Notebook display: ``layerwatch.show("run.h5", "conv3")`` animates a layer inline.

The GIF is rendered in memory — drawn by the same
:class:`~layerwatch.rendering.panel.LayerPanel` as :func:`layerwatch.render`'s —
and handed to IPython; no file is written.
"""

from __future__ import annotations

import io
import os
from typing import Any

from layerwatch.rendering.gif import GifWriter
from layerwatch.rendering.options import check_options
from layerwatch.rendering.panel import LayerPanel
from layerwatch.rendering.selection import select_frames
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
    check_options(max_frames=max_frames, fps=fps, scale=scale, max_channels=max_channels)
    with open_run(path) as run:
        n = run.num_snapshots
        if n == 0:
            raise RecordingError(f"{run.path} holds no snapshot yet: nothing to show.")
        (info,) = run.select_layers([layer])
        panel = LayerPanel(run, info, max_channels=max_channels, value_range=value_range)
        buffer = io.BytesIO()
        writer = GifWriter(buffer, panel.layout(scale).palette, fps=fps)
        for frame in panel.frames(select_frames(n, max_frames=max_frames), scale):
            writer.add(frame)
        writer.close()
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
        Colour range ``(low, high)``; default as in :func:`layerwatch.render`.

    Returns
    -------
    IPython.display.Image
        The animated GIF; Jupyter displays it when it is a cell's last value.

    Raises
    ------
    ImportError
        IPython is not installed (``pip install 'layerwatch[notebook]'``).
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
                          "Install it with: pip install 'layerwatch[notebook]' (or use "
                          "layerwatch.render to write GIF files).") from None
    return Image(data=layer_gif_bytes(path, layer, max_frames=max_frames, fps=fps, scale=scale,
                                      max_channels=max_channels, value_range=value_range),
                 format="gif")
