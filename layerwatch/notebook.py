"""Notebook display: ``layerwatch.show("run.h5", "conv3")`` animates a layer inline,
``layerwatch.show("run.h5")`` gives every layer the step slider of ``layerwatch view``.

The GIF is rendered in memory — drawn by the same
:class:`~layerwatch.rendering.panel.LayerPanel` as :func:`layerwatch.render`'s —
and handed to IPython; the slider is the viewer page with its data inline
(:func:`layerwatch.view.view_html`) in an iframe. No file is written.
"""

from __future__ import annotations

import html
import io
import os
from typing import Any

from layerwatch.rendering.gif import GifWriter
from layerwatch.rendering.options import check_options
from layerwatch.rendering.panel import LayerPanel
from layerwatch.rendering.selection import select_frames
from layerwatch.store import RecordingError, open_run


_SLIDER_HEIGHT = 720  # CSS pixels of the slider's iframe; the page scrolls inside it


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


def show(path: str | os.PathLike, layer: str | None = None, *, max_frames: int | None = 200,
         fps: float = 10.0, scale: int = 2, max_channels: int | None = 32,
         value_range: tuple[float, float] | None = None, slider: bool | None = None) -> Any:
    """Display one layer's animation, or the step slider, inline in Jupyter.

    Parameters
    ----------
    path
        A layerwatch recording.
    layer
        The layer's key or name, e.g. ``"conv3"``; None (with the slider)
        shows every layer.
    max_frames
        At most this many frames (evenly spaced; first and last kept), so the
        notebook stays light; ``None`` shows every snapshot.
    fps
        Frames per second (the GIF).
    scale
        Integer pixel zoom (the GIF; the slider zooms in the page).
    max_channels
        Draw at most this many channels; ``None`` draws all.
    value_range
        Colour range ``(low, high)`` of the GIF; default as in
        :func:`layerwatch.render` (the slider always uses the default).
    slider
        Show the page of ``layerwatch view`` — one step slider over the
        layers, hover values, curves with a cursor — instead of a GIF.
        Default: the slider when ``layer`` is None, else the GIF.

    Returns
    -------
    IPython.display.Image or IPython.display.HTML
        The animated GIF, or the slider page in an iframe; Jupyter displays
        it when it is a cell's last value.

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
    >>> layerwatch.show("runs/mnist.h5")            # doctest: +SKIP
    <IPython.core.display.HTML object>
    """
    try:
        from IPython import display
    except ImportError:
        raise ImportError("layerwatch.show displays in Jupyter/IPython, which is not installed. "
                          "Install it with: pip install 'layerwatch[notebook]' (or use "
                          "layerwatch.render to write GIF files).") from None
    if slider or (slider is None and layer is None):
        from layerwatch.view import view_html

        page = view_html(path, layers=None if layer is None else [layer],
                         max_channels=max_channels, max_frames=max_frames)
        return display.HTML(f'<iframe srcdoc="{html.escape(page, quote=True)}" '
                            f'title="layerwatch view" '
                            f'style="width:100%;height:{_SLIDER_HEIGHT}px;border:0"></iframe>')
    if layer is None:
        raise ValueError("Name the layer to show as a GIF, e.g. show(path, \"conv3\"), or "
                         "leave slider at its default to see every layer on the step slider.")
    return display.Image(data=layer_gif_bytes(path, layer, max_frames=max_frames, fps=fps,
                                              scale=scale, max_channels=max_channels,
                                              value_range=value_range), format="gif")
