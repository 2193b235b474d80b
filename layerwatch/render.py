"""Render a recording into per-layer GIFs, final-step stills and training curves.

Snapshots are streamed from the file one at a time, composed into frames of
palette indices (:mod:`layerwatch.frames`) and streamed into the GIF
(:mod:`layerwatch.gif`), so memory does not grow with the length of the run.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from layerwatch import frames as _frames
from layerwatch.colormap import value_indices
from layerwatch.gif import GifWriter, OverBudget, write_still
from layerwatch.store import LayerInfo, RecordingError, Run, open_run

#: Hysteresis of GIF frames, in colour levels (see :func:`layerwatch.colormap.value_indices`):
#: a cell's colour changes only when its value leaves the level by more than one
#: level, which removes sub-level flicker and halves the size of slowly drifting GIFs.
HOLD = 0.5
#: Percentile of |activation| that sets the colour range of unbounded layers.
ROBUST_PERCENTILE = 99.9
_RANGE_SNAPSHOTS = 64  # snapshots sampled for the robust range
_RANGE_VALUES = 1 << 16  # values sampled per snapshot for it
_MIN_BUDGET_FRAMES = 16  # frames kept before --max-bytes reduces the scale instead
_GIVE_UP = 3  # stop encoding an attempt at this multiple of --max-bytes
_MAX_SCALE = 16
_MAX_FPS = 50.0  # GIF delays are whole hundredths of a second; viewers slow faster ones

Progress = Callable[[int, int], None]
Notes = Callable[[str], None]


def render(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
           layers: Sequence[str] | str | None = None, every: int | None = None,
           max_frames: int | None = None, fps: float = 10.0, scale: int = 1,
           max_channels: int | None = 32, max_bytes: int | None = None,
           value_range: float | tuple[float, float] | None = None,
           progress: Progress | None = None, notes: Notes | None = None) -> list[Path]:
    """Render a recording: ``<layer>.gif``, ``<layer>.png`` per layer and ``curves.png``.

    Parameters
    ----------
    path
        The recording (``.h5``) written by :class:`layerwatch.LayerWatch`; it
        may still be being written (what has been flushed is rendered).
    out_dir
        Output directory, created if needed. Default ``outputs/<file stem>/``.
    layers
        Layer keys or names to render (default: all recorded layers).
    every
        Use every ``every``-th snapshot (the last one is always kept).
    max_frames
        At most this many frames per GIF, evenly spaced, first and last kept.
    fps
        Frames per second of the GIFs.
    scale
        Integer pixel zoom of the frames (cells are already scaled to the
        probe input size by nearest neighbour).
    max_channels
        Draw at most this many channels of a layer (the first ones); ``None``
        draws all.
    max_bytes
        Byte budget for each GIF: frames are subsampled (first and last kept)
        and then the scale reduced until the GIF fits. When even two frames at
        scale 1 do not fit, no GIF is written for that layer (its still is).
    value_range
        Colour range for all layers: ``m`` for ``(-m, m)`` or ``(low, high)``.
        Default: a bounded activation's natural range made symmetric around 0
        (tanh: ±1, sigmoid: ±1), else ±(99.9th percentile of the layer's
        |activation| over the run). ``low`` is red, the middle white, ``high`` blue.
    progress
        Called as ``progress(done, total)`` with frame counts as frames are written.
    notes
        Called with one line per thing worth telling (colour ranges chosen,
        frames dropped or scale reduced for ``max_bytes``). Without it, budget
        changes are issued as warnings.

    Returns
    -------
    list of pathlib.Path
        The files written, in order.

    Notes
    -----
    All frames of a GIF share one palette of 97 red-white-blue levels, so
    colours are comparable across frames. In GIF frames a cell keeps its
    colour until its value moves more than one level (:data:`HOLD`), which
    removes sub-level flicker and roughly halves GIF sizes; the first frame
    and the ``.png`` stills are exact to the nearest level.

    Raises
    ------
    RecordingError
        The file is missing, not a recording, damaged, or holds no snapshot.
    ValueError
        An option is out of range or names an unknown layer.

    Examples
    --------
    >>> render("runs/mnist.h5", max_bytes=2_000_000)   # doctest: +SKIP
    [PosixPath('outputs/mnist/conv1.gif'), PosixPath('outputs/mnist/conv1.png'), ...]
    """
    _check_options(every=every, max_frames=max_frames, fps=fps, scale=scale,
                   max_channels=max_channels, max_bytes=max_bytes)
    override = _check_range(value_range)
    out = Path("outputs") / Path(path).stem if out_dir is None else Path(out_dir)
    say = _Notes(notes)
    written: list[Path] = []
    with open_run(path) as run:
        created = not out.exists()
        stage: Path | None = None
        try:
            n = run.num_snapshots
            if n == 0:
                raise RecordingError(f"{run.path} holds no snapshot yet: nothing to render.")
            chosen = _select_layers(run, layers)
            steps, epochs = run.steps[:n], run.epochs[:n]
            indices = select_frames(n, every=every, max_frames=max_frames)
            out.mkdir(parents=True, exist_ok=True)
            # Everything is written into a hidden staging folder and moved into
            # place only when the whole render succeeded: a recording that turns
            # out damaged halfway leaves no partial output behind, and a viewer
            # of the folder (``layerwatch watch``) never sees a half-written GIF.
            stage = Path(tempfile.mkdtemp(prefix=".layerwatch-render-", dir=out))
            stems = _file_stems([layer.layer_name or layer.key for layer in chosen])
            probes = run.probes_x()
            counter = _Counter(progress, len(indices) * len(chosen))
            for layer, stem in zip(chosen, stems):
                vmin, vmax = _color_range(run, layer, override, n, say)
                job = _LayerJob(run, layer, probes, steps, epochs, vmin, vmax,
                                max_channels=max_channels, fps=fps)
                gif_path = _inside(stage, stem + ".gif")
                if job.write_gif(gif_path, indices, scale=scale, max_bytes=max_bytes,
                                 counter=counter, say=say):
                    written.append(gif_path)
                still = _inside(stage, stem + ".png")
                job.write_still(still, n - 1, scale=scale)
                written.append(still)
            from layerwatch.curves import write_curves

            curves = _inside(stage, "curves.png")
            if write_curves(run, curves):
                written.append(curves)
            else:
                say.info("curves.png not written: the recording holds no metrics.")
            final = []
            for staged in written:
                target = _inside(out, staged.name)
                os.replace(staged, target)
                final.append(target)
            return final
        except (OSError, KeyError) as exc:
            if isinstance(exc, OSError) and exc.filename is not None:
                raise  # writing the outputs failed: not the recording's fault
            raise RecordingError(f"{run.path} is damaged: {exc}") from exc
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()


def select_frames(n: int, *, every: int | None = None, max_frames: int | None = None
                  ) -> np.ndarray:
    """Snapshot indices to draw: every ``every``-th, at most ``max_frames``, first and last kept.

    Examples
    --------
    >>> select_frames(10, every=4).tolist()
    [0, 4, 8, 9]
    >>> select_frames(10, max_frames=3).tolist()
    [0, 4, 9]
    """
    indices = np.arange(n)
    if every is not None and every > 1:
        indices = np.union1d(indices[::every], [n - 1])
    if max_frames is not None and len(indices) > max_frames:
        picks = np.round(np.linspace(0, len(indices) - 1, max_frames)).astype(int)
        indices = indices[np.unique(picks)]
    return indices


# --------------------------------------------------------------------------- #
# One layer
# --------------------------------------------------------------------------- #


class _LayerJob:
    def __init__(self, run: Run, layer: LayerInfo, probes: np.ndarray, steps: np.ndarray,
                 epochs: np.ndarray, vmin: float, vmax: float, *, max_channels: int | None,
                 fps: float):
        self.run, self.layer, self.probes = run, layer, probes
        self.steps, self.epochs = steps, epochs
        self.vmin, self.vmax = vmin, vmax
        self.max_channels, self.fps = max_channels, fps
        self.name = layer.layer_name or layer.key
        self._layouts: dict[int, _frames.FrameLayout] = {}

    def layout(self, scale: int) -> _frames.FrameLayout:
        if scale not in self._layouts:
            widest = (f"step {self.steps.max(initial=0)}  epoch {self.epochs.max(initial=0) + 1}"
                      f"  {self.name}")
            self._layouts[scale] = _frames.build_layout(
                self.layer.shape, self.layer.channel_axis, self.probes, scale=scale,
                max_channels=self.max_channels,
                channels_first_input=self.layer.channel_axis == 0 and len(self.layer.shape) > 1,
                caption_sample=widest)
        return self._layouts[scale]

    def caption(self, i: int) -> str:
        return f"step {self.steps[i]}  epoch {self.epochs[i] + 1}  {self.name}"

    def write_still(self, path: Path, index: int, *, scale: int) -> None:
        layout = self.layout(scale)
        frame = layout.compose(self.run.activations(self.layer.key, index), self.vmin, self.vmax,
                               self.caption(index))
        write_still(path, frame, layout.palette)

    def write_gif(self, path: Path, indices: np.ndarray, *, scale: int, max_bytes: int | None,
                  counter: "_Counter", say: "_Notes") -> bool:
        """Write the GIF, within ``max_bytes`` if given; False when it cannot fit."""
        layout = self.layout(scale)
        if layout.channels_shown < layout.channels:
            say.info(f"{path.name}: showing {layout.channels_shown} of {layout.channels} "
                     "channels (raise --max-channels to see more).")
        full = indices
        current, current_scale = indices, scale
        while True:
            try:
                self._encode(path, current, current_scale, max_bytes, counter)
            except OverBudget as over:
                # Exact when the GIF was finished; extrapolated when it was cut
                # short far over budget (early frames are the largest, so this
                # overestimates and the next attempt errs small).
                estimate = over.written * len(current) / max(over.frames, 1)
                nxt = _next_attempt(full, current, current_scale, estimate, max_bytes)
                if nxt is None:
                    say.warn(f"{path.name} not written: even its first and last frames at "
                             f"scale 1 exceed --max-bytes {_size(max_bytes)}; see "
                             f"{path.with_suffix('.png').name} for the final step.")
                    return False
                counter.add_total(len(nxt[0]))
                current, current_scale = nxt
                continue
            if len(current) < len(full) or current_scale != scale:
                say.warn(f"{path.name}: kept {len(current)} of {len(full)} frames"
                         + (f" at scale {current_scale} (asked {scale})"
                            if current_scale != scale else "")
                         + f" to stay within --max-bytes {_size(max_bytes)}.")
            return True

    def _encode(self, path: Path, indices: np.ndarray, scale: int, max_bytes: int | None,
                counter: "_Counter") -> None:
        layout = self.layout(scale)
        tmp = path.with_name(f".{path.name}.tmp")
        # Finish GIFs that may be near the budget, to learn their true size;
        # give up early on hopeless ones.
        give_up = None if max_bytes is None else _GIVE_UP * max_bytes
        try:
            with open(tmp, "wb") as fp:
                writer = GifWriter(fp, layout.palette, fps=self.fps, max_bytes=give_up)
                snapshots = _stream(self.run, self.layer.key, indices)
                previous = None
                for i, activations in zip(indices, snapshots):
                    previous = value_indices(activations, self.vmin, self.vmax,
                                             previous=previous, hold=HOLD)
                    writer.add(layout.compose_indices(previous, self.caption(int(i))))
                    counter.step()
                size = writer.close()
            if max_bytes is not None and size > max_bytes:
                raise OverBudget(size, writer.frames)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def _stream(run: Run, key: str, indices: np.ndarray, block: int = 16):
    """Yield the snapshots at ``indices`` one by one, reading runs of consecutive
    snapshots in blocks (one HDF5 read per block is much cheaper than one per
    snapshot); memory stays at one block."""
    start = 0
    while start < len(indices):
        stop = min(start + block, len(indices))
        first, last = int(indices[start]), int(indices[stop - 1])
        if last - first == stop - start - 1:
            yield from run.activations(key, slice(first, last + 1))
        else:
            yield from run.iter_activations(key, indices[start:stop].tolist())
        start = stop


def _next_attempt(full: np.ndarray, current: np.ndarray, scale: int, estimate: float,
                  budget: int) -> tuple[np.ndarray, int] | None:
    """Fewer frames first (down to a floor), then a smaller scale, then down to 2 frames."""
    ratio = budget / estimate * 0.95  # aim a little under: sizes are not linear
    floor = min(len(full), _MIN_BUDGET_FRAMES)
    if len(current) > floor:
        count = max(floor, min(len(current) - 1, int(len(current) * ratio)))
        return _subsample(full, count), scale
    if scale > 1:
        smaller = max(1, min(scale - 1, int(scale * math.sqrt(ratio))))
        return full, smaller
    if len(current) > 2:
        return _subsample(full, max(2, min(len(current) - 1, int(len(current) * ratio)))), 1
    return None


def _subsample(indices: np.ndarray, count: int) -> np.ndarray:
    picks = np.unique(np.round(np.linspace(0, len(indices) - 1, count)).astype(int))
    return indices[picks]


# --------------------------------------------------------------------------- #
# Colour range
# --------------------------------------------------------------------------- #


def _color_range(run: Run, layer: LayerInfo, override: tuple[float, float] | None, n: int,
                 say: "_Notes") -> tuple[float, float]:
    if override is not None:
        return override
    if layer.value_range is not None:
        m = max(abs(layer.value_range[0]), abs(layer.value_range[1]))
        return -m, m
    m = robust_max(run, layer.key, n)
    say.info(f"{layer.layer_name or layer.key}: colour range ±{m:.3g} "
             f"({ROBUST_PERCENTILE}th percentile of |activation|; set --range to change).")
    return -m, m


def robust_max(run: Run, key: str, n: int | None = None) -> float:
    """The 99.9th percentile of |activation| of one layer over the run (sampled).

    Up to 64 evenly spaced snapshots and up to 65,536 values of each are used,
    so memory stays small for long runs and large layers. Non-finite values
    are ignored; 1.0 is returned when nothing finite and non-zero is left.
    """
    n = run.num_snapshots if n is None else n
    picks = np.unique(np.round(np.linspace(0, n - 1, min(n, _RANGE_SNAPSHOTS))).astype(int))
    samples = []
    for a in run.iter_activations(key, picks.tolist()):
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


# --------------------------------------------------------------------------- #
# Options, names, messages
# --------------------------------------------------------------------------- #


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_options(*, every, max_frames, fps, scale, max_channels, max_bytes) -> None:
    if every is not None and not (_is_int(every) and every >= 1):
        raise ValueError(f"every must be an integer >= 1. Received: every={every!r}")
    if max_frames is not None and not (_is_int(max_frames) and max_frames >= 2):
        raise ValueError("max_frames must be an integer >= 2 (the first and last frames are "
                         f"always kept). Received: max_frames={max_frames!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not 0 < fps <= _MAX_FPS:
        raise ValueError(f"fps must be a number in (0, {_MAX_FPS:g}]. Received: fps={fps!r}")
    if not (_is_int(scale) and 1 <= scale <= _MAX_SCALE):
        raise ValueError(f"scale must be an integer from 1 to {_MAX_SCALE}. "
                         f"Received: scale={scale!r}")
    if max_channels is not None and not (_is_int(max_channels) and max_channels >= 1):
        raise ValueError("max_channels must be an integer >= 1, or None for all. "
                         f"Received: max_channels={max_channels!r}")
    if max_bytes is not None and not (_is_int(max_bytes) and max_bytes >= 1):
        raise ValueError(f"max_bytes must be a positive integer. Received: max_bytes={max_bytes!r}")


def _check_range(value_range) -> tuple[float, float] | None:
    if value_range is None:
        return None
    if isinstance(value_range, (int, float, np.number)) and not isinstance(value_range, bool):
        low, high = -abs(float(value_range)), abs(float(value_range))
    else:
        try:
            low, high = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise ValueError("value_range must be a number m (for -m..m) or a pair (low, high). "
                             f"Received: value_range={value_range!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError("value_range must be finite with low < high (or m > 0). "
                         f"Received: value_range={value_range!r}")
    return low, high


def _select_layers(run: Run, layers: Sequence[str] | str | None) -> list[LayerInfo]:
    if layers is None:
        return list(run.layers)
    wanted = [layers] if isinstance(layers, str) else list(layers)
    if not wanted:
        raise ValueError("layers is empty: name at least one layer, or pass None for all.")
    chosen: list[LayerInfo] = []
    for name in wanted:
        try:
            layer = run.layer(name)
        except KeyError:
            known = ", ".join(layer.layer_name or layer.key for layer in run.layers)
            raise ValueError(f"The recording has no layer {name!r}. Recorded layers: {known}."
                             ) from None
        if layer not in chosen:
            chosen.append(layer)
    return chosen


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_stem(name: str) -> str:
    """A file name stem for a layer name that cannot leave its directory.

    Examples
    --------
    >>> safe_stem("../../etc/passwd")
    'etc_passwd'
    >>> safe_stem("encoder/conv 1")
    'encoder_conv_1'
    """
    stem = _UNSAFE.sub("_", name).strip("._")
    stem = re.sub(r"\.{2,}", ".", stem)[:100]
    return stem or "layer"


def _file_stems(names: Sequence[str]) -> list[str]:
    """Safe, distinct stems; none is "curves", so no layer overwrites curves.png."""
    taken = {"curves"}
    stems = []
    for name in names:
        stem = base = safe_stem(name)
        k = 2
        while stem.lower() in taken:
            stem = f"{base}_{k}"
            k += 1
        taken.add(stem.lower())
        stems.append(stem)
    return stems


def _inside(out: Path, name: str) -> Path:
    path = out / name
    if path.resolve().parent != out.resolve():  # belt and braces over safe_stem
        raise ValueError(f"Refusing to write {name!r} outside {out}.")
    return path


def _size(n: int | None) -> str:
    if n is None:
        return "unlimited"
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= factor:
            return f"{n / factor:.3g} {unit}"
    return f"{n} B"


class _Notes:
    def __init__(self, sink: Notes | None):
        self._sink = sink

    def info(self, text: str) -> None:
        if self._sink is not None:
            self._sink(text)

    def warn(self, text: str) -> None:
        if self._sink is not None:
            self._sink(text)
        else:
            warnings.warn(text, stacklevel=3)


class _Counter:
    def __init__(self, progress: Progress | None, total: int):
        self._progress, self.total, self.done = progress, total, 0

    def step(self) -> None:
        self.done += 1
        if self._progress is not None:
            self._progress(self.done, self.total)

    def add_total(self, extra: int) -> None:
        self.total += extra
