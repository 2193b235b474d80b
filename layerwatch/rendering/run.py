"""Render a recording into per-layer GIFs, final-step stills and training curves.

Snapshots are streamed from the file a block at a time, drawn by a
:class:`~layerwatch.rendering.panel.LayerPanel` into frames of palette indices and
streamed into the GIF (:mod:`~layerwatch.rendering.gif`), so memory does not grow
with the length of the run.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from layerwatch.rendering.features import write_feature_files
from layerwatch.rendering.gif import GifWriter, OverBudget, write_still
from layerwatch.outputs import default_out_dir
from layerwatch.rendering.names import file_stems, inside
from layerwatch.rendering.options import check_options, check_range
from layerwatch.rendering.panel import HOLD, MAX_HOLD, ROBUST_PERCENTILE, LayerPanel
from layerwatch.rendering.saliency import NAME as SALIENCY, SaliencyPanel, saliency_layer
from layerwatch.rendering.gradcam import GradCamPanel, gradcam_layers
from layerwatch.rendering.occlusion import OcclusionPanel, occlusion_layer
from layerwatch.rendering.selection import by_change, select_frames
from layerwatch.store import RecordingError, open_run
from layerwatch.text import format_bytes

_MIN_BUDGET_FRAMES = 16  # frames kept before --max-bytes reduces the scale instead
_GIVE_UP = 3  # stop encoding an attempt at this multiple of --max-bytes

Progress = Callable[[int, int], None]
Notes = Callable[[str], None]


def render(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
           layers: Sequence[str] | str | None = None, every: int | None = None,
           max_frames: int | None = None, fps: float = 10.0, scale: int = 1,
           max_channels: int | None = 32, max_bytes: int | None = None,
           value_range: float | tuple[float, float] | None = None,
           progress: Progress | None = None, notes: Notes | None = None) -> list[Path]:
    """Render a recording: ``<layer>.gif``, ``<layer>.png`` per layer and ``curves.png``,
    ``saliency.gif`` / ``saliency.png`` when the run recorded saliency maps,
    ``gradcam_<layer>.gif`` / ``.png`` for each rendered layer with Grad-CAM maps,
    ``occlusion.gif`` / ``occlusion.png`` (one frame per occlusion step) when it
    recorded occlusion maps, and ``features_<layer>.gif`` / ``.png`` when it
    recorded feature images (a frame per features step, every one of them:
    ``every``, ``max_frames`` and ``max_bytes`` apply to the snapshot GIFs; see
    :mod:`layerwatch.rendering.features`).

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
        Byte budget for each GIF: the colours' hysteresis is raised (up to 2
        levels), then frames are dropped, those that move the picture least
        towards its last frame first (first and last kept), and then the scale
        reduced, until the GIF fits. When even two frames at
        scale 1 do not fit, no GIF is written for that layer (its still is).
    value_range
        Colour range for all layers: ``m`` for ``(-m, m)`` or ``(low, high)``.
        Default: a bounded activation's natural range made symmetric around 0
        (tanh: ±1, sigmoid: ±1), else ±(99.9th percentile of the layer's
        |activation| over the run). ``low`` is red, the middle white, ``high`` blue.
        Saliency maps always use ±(99.9th percentile of |map| over the run).
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
    check_options(every=every, max_frames=max_frames, fps=fps, scale=scale,
                  max_channels=max_channels, max_bytes=max_bytes)
    override = check_range(value_range)
    out = default_out_dir(path) if out_dir is None else Path(out_dir)
    say = _Notes(notes)
    written: list[Path] = []
    with open_run(path) as run:
        created = not out.exists()
        stage: Path | None = None
        try:
            n = run.num_snapshots
            if n == 0:
                raise RecordingError(f"{run.path} holds no snapshot yet: nothing to render.")
            chosen = run.select_layers(layers)
            indices = select_frames(n, every=every, max_frames=max_frames)
            out.mkdir(parents=True, exist_ok=True)
            # Everything is written into a hidden staging folder and moved into
            # place only when the whole render succeeded: a recording that turns
            # out damaged halfway leaves no partial output behind, and a viewer
            # of the folder (``layerwatch watch``) never sees a half-written GIF.
            stage = Path(tempfile.mkdtemp(prefix=".layerwatch-render-", dir=out))
            saliency = saliency_layer(run) if run.has_saliency else None
            panels: list = [(layer, None) for layer in chosen]
            if saliency is not None:
                panels.append((saliency, SaliencyPanel))
            keys = {layer.key for layer in chosen}  # Grad-CAM of the layers rendered
            panels += [(cam, GradCamPanel) for cam in gradcam_layers(run) if cam.key in keys]
            occluded = occlusion_layer(run)
            if occluded is not None:
                panels.append((occluded, OcclusionPanel))
            # The saliency panel is drawn like a layer; its stem is "saliency"
            # unless a layer of that name took it.
            stems = file_stems([layer.layer_name or layer.key for layer, _ in panels])
            counter = _Counter(progress, len(indices) * len(panels))
            for (layer, kind), stem in zip(panels, stems):
                if kind is SaliencyPanel:
                    panel = SaliencyPanel(run, layer, n=n)
                    say.info(f"{SALIENCY}: colour range ±{panel.vmax:.3g} "
                             f"({ROBUST_PERCENTILE}th percentile of |d output / d input|, "
                             "mean over input channels).")
                elif kind is not None:  # Grad-CAM, occlusion: over the probes
                    panel = kind(run, layer, n=n)
                    say.info(panel.note())
                else:
                    panel = LayerPanel(run, layer, max_channels=max_channels,
                                       value_range=override, n=n)
                if panel.measured_range and kind is None:
                    say.info(f"{panel.name}: colour range ±{panel.vmax:.3g} "
                             f"({ROBUST_PERCENTILE}th percentile of |activation|; set --range "
                             "to change).")
                job = _LayerGif(panel, fps=fps)
                gif_path = inside(stage, stem + ".gif")
                frames = indices
                if panel.n != n:  # occlusion: its own steps
                    frames = select_frames(panel.n, every=every, max_frames=max_frames)
                    counter.add_total(len(frames) - len(indices))
                if job.write(gif_path, frames, scale=scale, max_bytes=max_bytes,
                             counter=counter, say=say):
                    written.append(gif_path)
                still = inside(stage, stem + ".png")
                write_still(still, panel.still(panel.n - 1, scale), panel.layout(scale).palette)
                written.append(still)
            written += write_feature_files(run, stage, keys=[layer.key for layer in chosen],
                                           fps=fps, scale=scale, reserved=stems)
            from layerwatch.rendering.curves import write_curves

            curves = inside(stage, "curves.png")
            if write_curves(run, curves):
                written.append(curves)
            else:
                say.info("curves.png not written: the recording holds no metrics.")
            final = []
            for staged in written:
                target = inside(out, staged.name)
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


# --------------------------------------------------------------------------- #
# One layer
# --------------------------------------------------------------------------- #


class _LayerGif:
    """One layer's GIF, re-encoded until it fits: more hysteresis first (up to
    :data:`~layerwatch.rendering.panel.MAX_HOLD` levels), then fewer frames (those
    that move the picture least go first), then a smaller scale."""

    def __init__(self, panel: LayerPanel, *, fps: float):
        self.panel, self.fps = panel, fps

    def write(self, path: Path, indices: np.ndarray, *, scale: int, max_bytes: int | None,
              counter: "_Counter", say: "_Notes") -> bool:
        """Write the GIF, within ``max_bytes`` if given; False when it cannot fit."""
        layout = self.panel.layout(scale)
        if layout.channels_shown < layout.channels:
            say.info(f"{path.name}: showing {layout.channels_shown} of {layout.channels} "
                     "channels (raise --max-channels to see more).")
        full = indices
        current, current_scale, hold = indices, scale, HOLD
        progress = None  # how far each frame moves the picture: measured when frames must go
        while True:
            try:
                self._encode(path, current, current_scale, hold, max_bytes, counter)
            except OverBudget as over:
                if hold < MAX_HOLD and len(current) == len(full):  # cheaper frames first
                    hold = min(MAX_HOLD, hold + 0.5)
                    counter.add_total(len(current))
                    continue
                # Exact when the GIF was finished; extrapolated when it was cut
                # short far over budget (early frames are the largest, so this
                # overestimates and the next attempt errs small).
                estimate = over.written * len(current) / max(over.frames, 1)
                if progress is None:
                    progress = self.panel.progress(full)
                nxt = _next_attempt(full, progress, current, current_scale, estimate, max_bytes)
                if nxt is None:
                    say.warn(f"{path.name} not written: even its first and last frames at "
                             f"scale 1 exceed --max-bytes {format_bytes(max_bytes)}; see "
                             f"{path.with_suffix('.png').name} for the final step.")
                    return False
                counter.add_total(len(nxt[0]))
                current, current_scale = nxt
                continue
            if len(current) < len(full) or current_scale != scale:
                say.warn(f"{path.name}: kept {len(current)} of {len(full)} frames"
                         + (f" at scale {current_scale} (asked {scale})"
                            if current_scale != scale else "")
                         + f" to stay within --max-bytes {format_bytes(max_bytes)}.")
            if hold != HOLD:
                say.info(f"{path.name}: colours follow values to within {0.5 + hold:g} "
                         f"colour levels (hysteresis raised from {HOLD:g} to {hold:g}) to stay "
                         f"within --max-bytes {format_bytes(max_bytes)}.")
            return True

    def _encode(self, path: Path, indices: np.ndarray, scale: int, hold: float,
                max_bytes: int | None, counter: "_Counter") -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        # Finish GIFs that may be near the budget, to learn their true size;
        # give up early on hopeless ones.
        give_up = None if max_bytes is None else _GIVE_UP * max_bytes
        try:
            with open(tmp, "wb") as fp:
                writer = GifWriter(fp, self.panel.layout(scale).palette, fps=self.fps,
                                   max_bytes=give_up)
                for frame in self.panel.frames(indices, scale, hold=hold):
                    writer.add(frame)
                    counter.step()
                size = writer.close()
            if max_bytes is not None and size > max_bytes:
                raise OverBudget(size, writer.frames)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def _next_attempt(full: np.ndarray, progress: np.ndarray, current: np.ndarray, scale: int,
                  estimate: float, budget: int) -> tuple[np.ndarray, int] | None:
    """Fewer frames first (those that move the picture least go first, down to a
    floor), then a smaller scale, then down to 2 frames."""
    ratio = budget / estimate * 0.95  # aim a little under: sizes are not linear
    floor = min(len(full), _MIN_BUDGET_FRAMES)
    if len(current) > floor:
        count = max(floor, min(len(current) - 1, int(len(current) * ratio)))
        return by_change(full, progress, count), scale
    if scale > 1:
        smaller = max(1, min(scale - 1, int(scale * math.sqrt(ratio))))
        return full, smaller
    if len(current) > 2:
        count = max(2, min(len(current) - 1, int(len(current) * ratio)))
        return by_change(full, progress, count), 1
    return None


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
