"""Frame layout: one snapshot of one layer as a 2-D array of palette indices.

A frame is a caption band (step, epoch, layer) above a grid: one column per
probe, the probe inputs in the top row, then one row per channel. Cells are
scaled to the input's size by nearest neighbour (crisp blocks); outputs of
1-D convolutions draw as strips. :class:`FrameLayout` precomputes, once per
layer, where every pixel of the grid reads its value from, so composing a
frame is one palette lookup and one gather.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

from layerwatch.rendering import colormap

#: Height in pixels (before ``scale``) of the strips that 1-D signals draw as.
STRIP_HEIGHT = 8
#: Cells are never larger than this many pixels a side (before ``scale``).
MAX_CELL = 256
_PAD = 2  # caption padding, font pixels


@lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont

    # The classic bitmap font: crisp at every integer zoom, no anti-aliasing
    # that would need extra palette entries.
    return ImageFont.load_default_imagefont()


@lru_cache(maxsize=512)
def text_mask(text: str) -> np.ndarray:
    """A boolean mask of ``text`` drawn in the built-in bitmap font (True = ink)."""
    from PIL import Image, ImageDraw

    text = text.encode("latin-1", "replace").decode("latin-1")
    font = _font()
    left, top, right, bottom = font.getbbox(text or " ")
    image = Image.new("1", (max(right, 1), max(bottom, 1)))
    ImageDraw.Draw(image).text((0, 0), text, font=font, fill=1)
    return np.array(image, dtype=bool)


def _nearest(n_out: int, n_in: int) -> np.ndarray:
    """Source index of each of ``n_out`` pixels when scaling ``n_in`` by nearest neighbour."""
    return (np.arange(n_out) * n_in) // n_out


def _display_shape(shape: Sequence[int], channel_axis: int) -> tuple[tuple[int, int], int]:
    """((h, w) of one channel as drawn, channels) for a per-probe shape."""
    spatial = [s for i, s in enumerate(shape) if i != channel_axis]
    channels = shape[channel_axis] if shape else 1
    if not spatial:
        return (1, 1), channels
    if len(spatial) == 1:
        return (1, spatial[0]), channels
    return (spatial[-2], spatial[-1]), channels


def probe_images(probes_x: np.ndarray, *, spatial_rank: int = 2,
                 channels_first: bool = False) -> np.ndarray:
    """The probe inputs as images: ``(P, h, w)`` grey or ``(P, h, w, 3)`` RGB.

    Parameters
    ----------
    probes_x
        Probes as fed to the model: ``(P, H, W, C)`` (or ``(P, C, H, W)`` with
        ``channels_first``), ``(P, H, W)``, or ``(P, L, C)`` for 1-D signals
        (``spatial_rank=1``), which draw as one strip per input channel.
    spatial_rank
        Number of spatial axes of the layer being drawn; decides how a
        rank-3 probe array is read.
    channels_first
        Whether probe channels come before the spatial axes.

    Returns
    -------
    numpy.ndarray
        Float images. Three channels are RGB; any other channel count shows
        the mean over channels in grey.
    """
    x = np.asarray(probes_x, dtype=np.float32)
    if x.ndim == 2:  # (P, L): one 1-D signal each
        return x[:, None, :]
    if x.ndim == 3:
        if spatial_rank == 1:
            return np.moveaxis(x, 1 if channels_first else 2, 1)  # (P, C, L): rows = channels
        return x
    if channels_first:
        x = np.moveaxis(x, 1, -1)
    while x.ndim > 4:  # volumes: the middle slice
        x = x[:, x.shape[1] // 2]
    if x.shape[-1] == 3:
        return x
    return x.mean(axis=-1)


def _input_indices(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Palette indices of probe images and the input colours the palette needs (RGB only)."""
    finite = images[np.isfinite(images)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if images.ndim == 3:
        return colormap.grey_indices(images, lo, hi), None
    from PIL import Image

    # RGB probes: one median-cut palette for all probes, computed once, so the
    # input row costs INPUT_LEVELS palette slots and never changes.
    span = hi - lo if hi > lo else 1.0
    rgb = np.nan_to_num((images - lo) / span * 255, nan=0.0).clip(0, 255).astype(np.uint8)
    p, h, w, _ = rgb.shape
    strip = Image.fromarray(rgb.reshape(p * h, w, 3), "RGB")
    quant = strip.quantize(colors=colormap.INPUT_LEVELS, method=Image.Quantize.MEDIANCUT,
                           dither=Image.Dither.NONE)
    colors = np.array(quant.getpalette()[: 3 * colormap.INPUT_LEVELS], dtype=np.uint8)
    idx = np.array(quant, dtype=np.uint8).reshape(p, h, w) + np.uint8(colormap.INPUT_START)
    idx[~np.isfinite(images).all(axis=-1)] = colormap.NAN
    return idx, colors.reshape(-1, 3)


@dataclass
class FrameLayout:
    """Where each pixel of a layer's frames comes from. Build with :func:`build_layout`.

    Attributes
    ----------
    height, width
        Frame size in pixels.
    palette
        The ``(256, 3)`` uint8 palette every frame of this layer uses.
    channels_shown, channels
        How many channels are drawn, of how many.
    grid_top, grid_left
        Frame pixel of the top-left corner of the first probe's input cell;
        cell ``(row, probe)`` (row 0 the inputs, row ``1 + c`` channel ``c``)
        starts ``(cell_height + gap) * (row, probe)`` pixels further.
    cell_height, cell_width, gap
        Size of one cell and of the lines between cells, in frame pixels.
    cell_values_shape
        ``(h, w)`` values one cell shows; frame pixel ``(y, x)`` of a cell shows
        value ``(y * h // cell_height, x * w // cell_width)`` of
        :meth:`cell_values`.
    """

    height: int
    width: int
    palette: np.ndarray
    channels_shown: int
    channels: int
    grid_top: int
    grid_left: int
    cell_height: int
    cell_width: int
    gap: int
    cell_values_shape: tuple[int, int]
    _base: np.ndarray
    _src: np.ndarray
    _grid_top: int
    _grid_bottom: int
    _zoom: int
    _caption_box: tuple[int, int, int, int]
    _cell_coords: list[tuple[np.ndarray, ...]]

    def cell_values(self, activations: np.ndarray) -> np.ndarray:
        """The values the channel cells show: ``(probes, channels_shown, h, w)``.

        ``activations`` is one snapshot ``(probes, *layer shape)``, or several
        ``(snapshots, probes, *layer shape)``, which give
        ``(snapshots, probes, channels_shown, h, w)``; the dtype is kept.
        """
        a = np.asarray(activations)
        lead = a.ndim - 1 - len(self._cell_coords[0])
        cells = [a[(slice(None),) * (lead + 1) + coords] for coords in self._cell_coords]
        return np.stack(cells, axis=lead + 1)

    def compose(self, activations: np.ndarray, vmin: float, vmax: float,
                caption: str = "") -> np.ndarray:
        """One frame: ``(height, width)`` uint8 palette indices.

        Parameters
        ----------
        activations
            One snapshot, ``(probes, *layer shape)``.
        vmin, vmax
            Colour range: ``vmin`` red, the middle white, ``vmax`` blue.
        caption
            Text for the top-left corner.
        """
        return self.compose_indices(colormap.value_indices(activations, vmin, vmax), caption)

    def compose_indices(self, indices: np.ndarray, caption: str = "") -> np.ndarray:
        """One frame from a snapshot already mapped to palette indices (same shape)."""
        values = np.append(indices.ravel(), np.array([colormap.GAP, colormap.HEADER], np.uint8))
        frame = self._base.copy()
        np.take(values, self._src, out=frame[self._grid_top:self._grid_bottom])
        if caption:
            self._draw_caption(frame, caption)
        return frame

    def _draw_caption(self, frame: np.ndarray, caption: str) -> None:
        mask = text_mask(caption)
        if self._zoom > 1:
            mask = mask.repeat(self._zoom, axis=0).repeat(self._zoom, axis=1)
        top, left, bottom, right = self._caption_box
        h = min(mask.shape[0], bottom - top)
        w = min(mask.shape[1], right - left)
        region = frame[top:top + h, left:left + w]
        region[mask[:h, :w]] = colormap.TEXT


def build_layout(layer_shape: Sequence[int], channel_axis: int, probes_x: np.ndarray, *,
                 scale: int = 1, max_channels: int | None = None,
                 channels_first_input: bool = False,
                 caption_sample: str = "step 00000  epoch 000") -> FrameLayout:
    """Precompute the frame layout of one layer.

    Parameters
    ----------
    layer_shape
        Per-probe output shape of the layer (as :class:`layerwatch.store.LayerInfo.shape`).
    channel_axis
        Axis of ``layer_shape`` that holds channels.
    probes_x
        The probe inputs as fed to the model (drawn in the top row).
    scale
        Integer pixel zoom of the whole frame.
    max_channels
        Draw at most this many channels (the first ones); ``None`` draws all.
    channels_first_input
        Whether ``probes_x`` is channels-first.
    caption_sample
        The longest caption expected; the frame is made wide enough for it.

    Returns
    -------
    FrameLayout
    """
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer. Received: scale={scale!r}")
    if max_channels is not None and (int(max_channels) != max_channels or max_channels < 1):
        raise ValueError("max_channels must be a positive integer or None. "
                         f"Received: max_channels={max_channels!r}")
    scale = int(scale)
    shape = tuple(int(s) for s in layer_shape)
    (lh, lw), channels = _display_shape(shape, channel_axis)
    spatial_rank = len(shape) - 1
    images = probe_images(probes_x, spatial_rank=spatial_rank, channels_first=channels_first_input)
    n_probes = images.shape[0]
    ih, iw = images.shape[1], images.shape[2]

    if spatial_rank == 1:  # strips: as wide as the signal, a fixed height
        cell_h, cell_w = STRIP_HEIGHT, max(iw, lw)
    elif spatial_rank == 0:
        cell_h, cell_w = ih, iw
    else:
        cell_h, cell_w = max(ih, lh), max(iw, lw)
    cell_h, cell_w = min(cell_h, MAX_CELL) * scale, min(cell_w, MAX_CELL) * scale
    gap = scale
    shown = channels if max_channels is None else min(channels, int(max_channels))
    rows = 1 + shown
    grid_w = gap + n_probes * (cell_w + gap)
    grid_h = gap + rows * (cell_h + gap)

    font_h = text_mask(caption_sample).shape[0]
    caption_w = text_mask(caption_sample).shape[1]
    header_h = (font_h + _PAD) * scale
    width = max(grid_w, (caption_w + 2 * _PAD) * scale)
    height = header_h + grid_h
    x0 = (width - grid_w) // 2

    in_idx, in_colors = _input_indices(images)
    palette = colormap.build_palette(input_colors=in_colors)

    base = np.full((height, width), colormap.HEADER, dtype=np.uint8)
    base[header_h:, x0:x0 + grid_w] = colormap.GAP
    ys, xs = _nearest(cell_h, ih), _nearest(cell_w, iw)
    top = header_h + gap
    for p in range(n_probes):
        left = x0 + gap + p * (cell_w + gap)
        base[top:top + cell_h, left:left + cell_w] = in_idx[p][np.ix_(ys, xs)]

    # Flat index into the snapshot (probes, *shape) for every pixel of the
    # channel rows; len(snapshot) stands for "gap", len(snapshot) + 1 for margin.
    grid_top = header_h + gap + cell_h + gap
    grid_bottom = header_h + grid_h
    size = n_probes * int(np.prod(shape))
    src = np.full((grid_bottom - grid_top, width), size + 1, dtype=np.int64)
    src[:, x0:x0 + grid_w] = size
    cy, cx = _nearest(cell_h, lh), _nearest(cell_w, lw)
    coords = _coords(shape, channel_axis, cy, cx)
    value_coords = _coords(shape, channel_axis, np.arange(lh), np.arange(lw))
    for c in range(shown):
        for p in range(n_probes):
            flat = np.ravel_multi_index((p, *coords(c)), (n_probes, *shape))
            r0 = c * (cell_h + gap)
            c0 = x0 + gap + p * (cell_w + gap)
            src[r0:r0 + cell_h, c0:c0 + cell_w] = flat
    if src.max(initial=0) < 2**31:
        src = src.astype(np.int32)
    caption_box = (_PAD // 2 * scale, _PAD * scale, header_h, width)
    return FrameLayout(height=height, width=width, palette=palette, channels_shown=shown,
                       channels=channels, grid_top=top, grid_left=x0 + gap,
                       cell_height=cell_h, cell_width=cell_w, gap=gap,
                       cell_values_shape=(lh, lw), _base=base, _src=src, _grid_top=grid_top,
                       _grid_bottom=grid_bottom, _zoom=scale, _caption_box=caption_box,
                       _cell_coords=[tuple(value_coords(c)) for c in range(shown)])


def _coords(shape: tuple[int, ...], channel_axis: int, cy: np.ndarray, cx: np.ndarray):
    """A function of channel -> index arrays (one per axis of ``shape``) for one cell."""
    spatial_axes = [i for i in range(len(shape)) if i != channel_axis]
    yy, xx = np.meshgrid(cy, cx, indexing="ij")

    def coords(c: int) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.zeros_like(yy)] * len(shape)
        if shape:
            out[channel_axis] = np.full_like(yy, c)
        if len(spatial_axes) >= 1:
            out[spatial_axes[-1]] = xx
        if len(spatial_axes) >= 2:
            out[spatial_axes[-2]] = yy
        for axis in spatial_axes[:-2]:  # volumes: the middle slice
            out[axis] = np.full_like(yy, shape[axis] // 2)
        return out

    return coords
