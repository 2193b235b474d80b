"""Writing palette-index frames as an animated GIF, one frame at a time.

Pillow's ``save_all`` keeps every frame in memory before writing; this writer
streams instead, using Pillow's GIF header and LZW frame encoder
(``GifImagePlugin.getheader`` / ``getdata``). All frames share one global
palette. Each frame after the first is stored as the rectangle that changed,
with unchanged pixels inside it set to a transparent index: for layers that
change slowly this is most of the frame, and long transparent runs cost LZW
almost nothing.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import numpy as np
from PIL import GifImagePlugin, Image

from layerwatch.rendering import colormap


class OverBudget(Exception):
    """The GIF grew past its byte budget while being written."""

    def __init__(self, written: int, frames: int):
        super().__init__(f"{written} bytes after {frames} frames")
        self.written = written
        self.frames = frames


class GifWriter:
    """Stream frames of palette indices into an animated GIF.

    Parameters
    ----------
    fp
        A binary file open for writing.
    palette
        ``(256, 3)`` uint8 palette; index :data:`layerwatch.colormap.TRANSPARENT`
        must be unused by the frames.
    fps
        Frames per second (GIF stores durations in hundredths of a second).
    max_bytes
        Raise :class:`OverBudget` as soon as the file grows past this size.
    """

    def __init__(self, fp: BinaryIO, palette: np.ndarray, *, fps: float,
                 max_bytes: int | None = None):
        self._fp = fp
        self._palette = np.asarray(palette, dtype=np.uint8).reshape(colormap.PALETTE_SIZE, 3)
        self._duration = max(10, int(round(100.0 / fps)) * 10)  # ms, whole centiseconds
        self._max_bytes = max_bytes
        self._prev: np.ndarray | None = None
        self._pending: tuple[np.ndarray, tuple[int, int], int, bool] | None = None
        self.frames = 0  #: frames added (identical frames merged still count)
        self.written = 0  #: bytes written so far

    def add(self, frame: np.ndarray) -> None:
        """Append one ``(height, width)`` uint8 frame of palette indices."""
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        self.frames += 1
        if self._prev is None:
            self._write(self._header(frame))
            self._pending = (frame, (0, 0), self._duration, False)
            self._prev = frame
            return
        if frame.shape != self._prev.shape:
            raise ValueError(f"Every frame must have the first frame's shape {self._prev.shape}. "
                             f"Received: shape={frame.shape}")
        changed = frame != self._prev
        rows = np.flatnonzero(changed.any(axis=1))
        if rows.size == 0:  # identical: show the previous frame longer
            image, offset, duration, transparent = self._pending
            self._pending = (image, offset, duration + self._duration, transparent)
            return
        cols = np.flatnonzero(changed.any(axis=0))
        y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        patch = frame[y0:y1, x0:x1].copy()
        patch[~changed[y0:y1, x0:x1]] = colormap.TRANSPARENT
        self._flush_pending()
        self._pending = (patch, (int(x0), int(y0)), self._duration, True)
        self._prev = frame

    def close(self) -> int:
        """Write the last frame and the trailer; return the bytes written."""
        self._flush_pending()
        self._write(b";")
        return self.written

    def _header(self, frame: np.ndarray) -> bytes:
        image = self._image(frame)
        header, _ = GifImagePlugin.getheader(image, info={"loop": 0, "duration": self._duration})
        return b"".join(header)

    def _image(self, array: np.ndarray) -> Image.Image:
        image = Image.fromarray(array, "P")
        image.putpalette(self._palette.tobytes())
        return image

    def _flush_pending(self) -> None:
        if self._pending is None:
            return
        array, offset, duration, transparent = self._pending
        self._pending = None
        params = {"duration": duration, "disposal": 1}
        if transparent:
            params["transparency"] = colormap.TRANSPARENT
        image = Image.fromarray(array, "P")  # the global palette applies
        self._write(b"".join(GifImagePlugin.getdata(image, offset, **params)))

    def _write(self, data: bytes) -> None:
        self._fp.write(data)
        self.written += len(data)
        if self._max_bytes is not None and self.written > self._max_bytes:
            raise OverBudget(self.written, self.frames)


def write_still(path: str | os.PathLike, frame: np.ndarray, palette: np.ndarray) -> None:
    """Write one frame of palette indices as a paletted PNG."""
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "P")
    image.putpalette(np.asarray(palette, dtype=np.uint8).tobytes())
    image.save(path, format="PNG", optimize=True)
