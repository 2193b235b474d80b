"""Feature images drawn: ``features_<layer>.gif`` and ``features_<layer>.png``.

A run recorded with ``LayerWatch(..., features_every=N)`` holds, per layer and
features step, the input that most excites each of the layer's first channels
(``docs/FORMAT.md``, "Features"). A frame shows one step: a caption band with
the step and the layer, then one tile per channel, labelled ``c<index>`` (the
model's channel index; ``c<index>*`` when ascent did not beat the best probe
and that probe is shown instead). Images are drawn as the probes are (grey,
or RGB for three-channel inputs, nearest-neighbour zoom, same palette and
caption as the other GIFs), but **each tile is scaled to its own min…max**:
ascent images have no common scale, and a shared one would leave most tiles
flat. The ``.png`` is the last step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from layerwatch.rendering import colormap
from layerwatch.rendering.gif import GifWriter, write_still
from layerwatch.rendering.layout import probe_images, text_mask
from layerwatch.rendering.names import file_stems, inside
from layerwatch.store import Run

#: File names start with this, then the layer's stem.
PREFIX = "features_"
#: Tiles per row of a frame.
COLUMNS = 8
#: A tile is zoomed (nearest neighbour) to at least this many pixels a side, before ``scale``.
MIN_TILE = 32
_PAD = 2
#: RGB inputs: a 5×5×5 colour cube in the palette's input slots (125 of 128).
_CUBE = 5


def _cube_colors() -> np.ndarray:
    steps = np.round(np.linspace(0, 255, _CUBE)).astype(np.uint8)
    r, g, b = np.meshgrid(steps, steps, steps, indexing="ij")
    return np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1)


class FeaturePanel:
    """The feature frames of one layer of one run."""

    def __init__(self, run: Run, key: str, *, scale: int = 1):
        layer = run.layer(key)
        self.run, self.key, self.scale = run, layer.key, int(scale)
        self.name = layer.layer_name or layer.key
        self.steps = run.feature_steps
        self.channels = run.feature_channels(layer.key)
        self._kept_probe = ~(run.feature_activation(layer.key)
                             > run.feature_probe_best(layer.key))
        self._spatial_rank = max(len(layer.shape) - 1, 0)
        self._channels_first = run.attrs.get("image_data_format") == "channels_first"
        sample = self._images(0)
        self._rgb = sample.ndim == 4
        self.palette = colormap.build_palette(
            input_colors=_cube_colors() if self._rgb else None)
        h, w = sample.shape[1:3]
        zoom = max(1, min(math.ceil(MIN_TILE / max(h, w)), max(1, 256 // max(h, w))))
        self._zoom = zoom * self.scale
        self._tile = (h * self._zoom, w * self._zoom)
        self._font_h = text_mask("c0").shape[0]
        widest = self.caption(len(self.steps) - 1 if len(self.steps) else 0)
        n = len(self.channels)
        self._cols = min(n, COLUMNS)
        rows = math.ceil(n / self._cols)
        gap = self.scale
        self._label_h = (self._font_h + 1) * self.scale
        self._cell = (self._label_h + self._tile[0], self._tile[1])
        self._grid_w = grid_w = gap + self._cols * (self._cell[1] + gap)
        self._header = (self._font_h + _PAD) * self.scale
        self.width = max(grid_w, (text_mask(widest).shape[1] + 2 * _PAD) * self.scale)
        self.height = self._header + gap + rows * (self._cell[0] + gap)
        self._x0 = (self.width - grid_w) // 2

    def caption(self, i: int) -> str:
        step = int(self.steps[i]) if len(self.steps) else 0
        return f"step {step}  {self.name} features  (each tile: own min-max)"

    def _images(self, i: int) -> np.ndarray:
        """Row ``i`` as display images: ``(channels, h, w)`` grey or ``(…, 3)`` RGB."""
        return probe_images(self.run.features(self.key, i), spatial_rank=self._spatial_rank,
                            channels_first=self._channels_first)

    def _indices(self, image: np.ndarray) -> np.ndarray:
        """One tile's palette indices, scaled to its own finite min…max."""
        finite = image[np.isfinite(image)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if not self._rgb:
            return colormap.grey_indices(image, lo, hi)
        span = hi - lo if hi > lo else 1.0
        level = np.rint(np.nan_to_num((image - lo) / span).clip(0, 1) * (_CUBE - 1))
        level = level.astype(np.int64)
        out = (level[..., 0] * _CUBE * _CUBE + level[..., 1] * _CUBE + level[..., 2]
               + colormap.INPUT_START).astype(np.uint8)
        out[~np.isfinite(image).all(axis=-1)] = colormap.NAN
        return out

    def frame(self, i: int) -> np.ndarray:
        """The frame of feature row ``i``: ``(height, width)`` uint8 palette indices."""
        frame = np.full((self.height, self.width), colormap.HEADER, dtype=np.uint8)
        gap = self.scale
        frame[self._header:, self._x0:self._x0 + self._grid_w] = colormap.GAP
        self._text(frame, self.caption(i), _PAD // 2 * self.scale, _PAD * self.scale)
        for c, image in enumerate(self._images(i)):
            row, col = divmod(c, self._cols)
            top = self._header + gap + row * (self._cell[0] + gap)
            left = self._x0 + gap + col * (self._cell[1] + gap)
            frame[top:top + self._label_h, left:left + self._cell[1]] = colormap.HEADER
            label = f"c{int(self.channels[c])}" + ("*" if self._kept_probe[i, c] else "")
            self._text(frame, label, top, left + self.scale,
                       bottom=top + self._label_h, right=left + self._cell[1])
            tile = self._indices(image).repeat(self._zoom, axis=0).repeat(self._zoom, axis=1)
            frame[top + self._label_h:top + self._cell[0], left:left + self._cell[1]] = tile
        return frame

    def _text(self, frame: np.ndarray, text: str, top: int, left: int, *,
              bottom: int | None = None, right: int | None = None) -> None:
        mask = text_mask(text)
        if self.scale > 1:
            mask = mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        bottom = frame.shape[0] if bottom is None else bottom
        right = frame.shape[1] if right is None else right
        h, w = min(mask.shape[0], bottom - top), min(mask.shape[1], right - left)
        region = frame[top:top + h, left:left + w]
        region[mask[:h, :w]] = colormap.TEXT


def write_feature_files(run: Run, out: Path, *, keys: Sequence[str] | None = None,
                        fps: float = 10.0, scale: int = 1,
                        reserved: Sequence[str] = ()) -> list[Path]:
    """Write ``features_<layer>.gif`` (a frame per features step) and
    ``features_<layer>.png`` (the last) for each layer with feature images
    (``keys``: only these layers); nothing when the run has none.
    ``reserved`` are stems already taken in ``out``."""
    if not run.has_features or not len(run.feature_steps):
        return []
    wanted = run.feature_layers if keys is None else [
        k for k in run.feature_layers if k in set(keys)]
    names = [PREFIX + (run.layer(k).layer_name or k) for k in wanted]
    stems = file_stems(names, reserved=("curves", *reserved))
    written = []
    for key, stem in zip(wanted, stems):
        panel = FeaturePanel(run, key, scale=scale)
        gif = inside(out, stem + ".gif")
        with open(gif, "wb") as fp:
            writer = GifWriter(fp, panel.palette, fps=fps)
            last = None
            for i in range(len(panel.steps)):
                last = panel.frame(i)
                writer.add(last)
            writer.close()
        still = inside(out, stem + ".png")
        write_still(still, last, panel.palette)
        written += [gif, still]
    return written
