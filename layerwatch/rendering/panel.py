"""One layer of one run, drawn: its colour range, frame layout, captions and frames.

Every picture of a layer — ``layerwatch render``'s GIFs and stills, each panel
of ``layerwatch compare``, ``layerwatch.show`` in a notebook — comes from a
:class:`LayerPanel`, so they are drawn alike: same palette
(:mod:`~layerwatch.rendering.colormap`), same layout
(:mod:`~layerwatch.rendering.layout`), same colour-range rule, same caption and
same hysteresis.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from layerwatch.rendering import colormap
from layerwatch.rendering import layout as _layout
from layerwatch.rendering.colormap import value_indices
from layerwatch.rendering.selection import evenly_spaced
from layerwatch.store import LayerInfo, Run

#: Hysteresis of GIF frames, in colour levels (see
#: :func:`layerwatch.rendering.colormap.value_indices`): a cell keeps its colour
#: while its value stays within ``0.5 + HOLD`` levels of it, which removes
#: flicker between neighbouring levels and makes slowly drifting GIFs a third
#: to a half smaller. Stills and a GIF's first frame are exact to the level.
HOLD = 1.0
#: The most hysteresis ``--max-bytes`` may use before it drops frames instead.
MAX_HOLD = 2.0
#: Percentile of |activation| that sets the colour range of unbounded layers.
ROBUST_PERCENTILE = 99.9
_RANGE_SNAPSHOTS = 64  # snapshots sampled for the robust range
_RANGE_VALUES = 1 << 16  # values sampled per snapshot for it


def robust_max(run: Run, key: str, n: int | None = None, *,
               read: Callable[[list[int]], Iterable[np.ndarray]] | None = None) -> float:
    """The 99.9th percentile of |activation| of one layer over the run (sampled).

    Up to 64 evenly spaced snapshots and up to 65,536 values of each are used,
    so memory stays small for long runs and large layers. Non-finite values
    are ignored; 1.0 is returned when nothing finite and non-zero is left.
    ``read(indices)`` reads other per-snapshot values instead of the layer's
    (the saliency maps: :mod:`~layerwatch.rendering.saliency`).
    """
    n = run.num_snapshots if n is None else n
    if read is None:
        def read(indices):
            return run.iter_activations(key, indices)
    samples = []
    for a in read(evenly_spaced(n, _RANGE_SNAPSHOTS).tolist()):
        flat = np.abs(a.ravel())
        stride = max(1, flat.size // _RANGE_VALUES)
        flat = flat[::stride]
        samples.append(flat[np.isfinite(flat)])
    values = np.concatenate(samples) if samples else np.zeros(0)
    if values.size == 0:
        return 1.0
    m = float(np.percentile(values, ROBUST_PERCENTILE))
    if not (math.isfinite(m) and m > 0):
        m = float(values.max())
    return m if math.isfinite(m) and m > 0 else 1.0


def color_range(run: Run, layer: LayerInfo, value_range: tuple[float, float] | None = None,
                n: int | None = None) -> tuple[float, float]:
    """The colour range of a layer: ``value_range`` if given; else a bounded
    activation's natural range made symmetric about 0; else ±(99.9th
    percentile of |activation| over the first ``n`` snapshots)."""
    if value_range is not None:
        return float(value_range[0]), float(value_range[1])
    if layer.value_range is not None:
        m = max(abs(layer.value_range[0]), abs(layer.value_range[1]))
        return -m, m
    m = robust_max(run, layer.key, n)
    return -m, m


class LayerPanel:
    """The frames of one layer of one run.

    Parameters
    ----------
    run, layer
        The open recording and the layer to draw.
    max_channels
        Draw at most this many channels (the first ones); None draws all.
    value_range
        Colour range ``(low, high)``; default :func:`color_range`'s rule.
    label
        A run label to caption frames with (side by side comparisons);
        None captions with the step, epoch and layer name.
    caption_sample
        The widest caption any panel beside this one will show, so panels
        reserve the same caption width.
    n
        Snapshots to use (default: all committed when the run was opened).
    """

    def __init__(self, run: Run, layer: LayerInfo, *, max_channels: int | None,
                 value_range: tuple[float, float] | None = None, label: str | None = None,
                 caption_sample: str | None = None, n: int | None = None):
        self.run, self.layer, self.label = run, layer, label
        self.n = run.num_snapshots if n is None else n
        self.name = layer.layer_name or layer.key
        self.steps, self.epochs = run.steps[:self.n], run.epochs[:self.n]
        #: Whether the colour range was measured (99.9th percentile), not given or natural.
        self.measured_range = value_range is None and layer.value_range is None
        self.vmin, self.vmax = color_range(run, layer, value_range, self.n)
        self.max_channels = max_channels
        self._probes = run.probes_for(layer)
        self._index = {int(s): i for i, s in enumerate(self.steps)}
        self._caption_sample = caption_sample or self._widest_caption()
        self._layouts: dict[int, _layout.FrameLayout] = {}

    def layout(self, scale: int) -> _layout.FrameLayout:
        """The frame layout at an integer zoom (built once per scale)."""
        if scale not in self._layouts:
            self._layouts[scale] = _layout.build_layout(
                self.layer.shape, self.layer.channel_axis, self._probes, scale=scale,
                max_channels=self.max_channels,
                channels_first_input=self.layer.channel_axis == 0 and len(self.layer.shape) > 1,
                caption_sample=self._caption_sample)
        return self._layouts[scale]

    def index(self, step: int) -> int:
        """The snapshot index of a recorded step."""
        return self._index[int(step)]

    def caption(self, i: int) -> str:
        if self.label is not None:
            return f"{self.label}  step {self.steps[i]}"
        return f"step {self.steps[i]}  epoch {self.epochs[i] + 1}  {self.name}"

    def _widest_caption(self) -> str:
        if self.label is not None:
            return f"{self.label}  step {self.steps.max(initial=0)}"
        return (f"step {self.steps.max(initial=0)}  epoch {self.epochs.max(initial=0) + 1}"
                f"  {self.name}")

    def still(self, index: int, scale: int) -> np.ndarray:
        """The frame of one snapshot, exact to the nearest colour level."""
        return self.layout(scale).compose(self._values(index), self.vmin, self.vmax,
                                          self.caption(index))

    def frames(self, indices: Sequence[int], scale: int, *,
               hold: float = HOLD) -> Iterator[np.ndarray]:
        """The GIF frames of these snapshots, with ``hold`` hysteresis (default
        :data:`HOLD`): the first is exact, later cells change colour only when
        their value leaves its level by more than ``0.5 + hold`` levels.
        ``hold=0`` draws every frame exact, as :meth:`still` does."""
        for frame, _ in self.frames_and_values(indices, scale, hold=hold):
            yield frame

    def frames_and_values(self, indices: Sequence[int], scale: int, *, hold: float = HOLD
                          ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Like :meth:`frames`, each frame with the snapshot it was drawn from
        (``(probes, *layer shape)``, float32)."""
        layout = self.layout(scale)
        previous = None
        for i, activations in zip(indices, self._stream(np.asarray(indices))):
            previous = value_indices(activations, self.vmin, self.vmax, previous=previous,
                                     hold=hold)
            yield layout.compose_indices(previous, self.caption(int(i))), activations

    def progress(self, indices: Sequence[int]) -> np.ndarray:
        """Per snapshot of ``indices``, how far it moved the picture towards the
        last one: the change, from the snapshot before, of the mean distance
        (in colour levels) to the last snapshot.

        A layer that is still finding its representation scores high; one
        that jitters around where it settled scores near zero, however many
        cells flicker.
        """
        indices = np.asarray(indices)
        last = self._values(int(indices[-1]))
        level = (self.vmax - self.vmin) / max(colormap.LEVELS - 1, 1)
        distance = np.array([float(np.nanmean(np.abs(a - last))) for a in self._stream(indices)])
        moved = np.abs(np.diff(distance, prepend=distance[:1])) / level
        return np.nan_to_num(moved, nan=0.0, posinf=0.0)

    def _stream(self, indices: np.ndarray, block: int = 16) -> Iterator[np.ndarray]:
        """The snapshots at ``indices`` one by one, runs of consecutive snapshots
        read in blocks (one HDF5 read per block is much cheaper than one per
        snapshot); memory stays at one block."""
        start = 0
        while start < len(indices):
            stop = min(start + block, len(indices))
            first, last = int(indices[start]), int(indices[stop - 1])
            if last - first == stop - start - 1:
                yield from self._values(slice(first, last + 1))
            else:
                yield from self._values(indices[start:stop].tolist())
            start = stop

    def _values(self, index) -> np.ndarray:
        """What is drawn, indexed along snapshots as :meth:`Run.activations` is
        (a subclass draws something else: :class:`~layerwatch.rendering.saliency.SaliencyPanel`)."""
        return self.run.activations(self.layer.key, index)
