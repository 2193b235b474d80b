"""Compare runs: the same layer of two or more recordings side by side, and their curves.

Each frame of ``<layer>.gif`` puts one panel per run next to each other, every
panel drawn exactly as :func:`layerwatch.render` draws it (same frame layout,
palette and colour range rules) and captioned with the run's label and the
step. Frames are aligned by step on the **intersection** of the runs' steps:
every frame shows all runs at exactly the same training step, never a stale
snapshot of a run that was recorded less often. ``curves.png`` overlays the
runs' training curves, one colour per run.

Runs must line up: the compared layers must exist in every run with the same
shape, and the probes must have the same count and shape. Otherwise
:class:`CompareError` says what differs and how to fix it.
"""

from __future__ import annotations

import os
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from layerwatch.outputs import compare_out_dir
from layerwatch.rendering import colormap
from layerwatch.rendering.gif import GifWriter, write_still
from layerwatch.rendering.names import file_stems
from layerwatch.rendering.options import check_options
from layerwatch.rendering.panel import ROBUST_PERCENTILE, LayerPanel
from layerwatch.rendering.selection import select_frames
from layerwatch.store import Run, open_run

_SEPARATOR = 4  # pixels (before scale) between panels


class CompareError(ValueError):
    """The runs cannot be compared: their layers, probes or steps do not line up."""


# --------------------------------------------------------------------------- #
# Panels side by side
# --------------------------------------------------------------------------- #


def _input_remap(palette: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """A lookup table moving a panel's input colours onto the reference palette's nearest.

    Value levels and the special colours are the same in every palette; only
    the input slots of RGB probes differ between runs with different probes.
    """
    lut = np.arange(colormap.PALETTE_SIZE, dtype=np.uint8)
    if np.array_equal(palette, reference):
        return lut
    start, stop = colormap.INPUT_START, colormap.INPUT_START + colormap.INPUT_LEVELS
    ours = palette[start:stop].astype(np.int32)
    theirs = reference[start:stop].astype(np.int32)
    distance = ((ours[:, None, :] - theirs[None, :, :]) ** 2).sum(axis=2)
    lut[start:stop] = start + distance.argmin(axis=1)
    return lut


class _SideBySide:
    """Joins the panels of one step into one frame."""

    def __init__(self, panels: Sequence[LayerPanel], scale: int):
        self.panels = list(panels)
        self.scale = scale
        layouts = [p.layout(scale) for p in self.panels]
        self.palette = layouts[0].palette
        self.luts = [_input_remap(layout.palette, self.palette) for layout in layouts]
        self.height = max(layout.height for layout in layouts)
        self.gap = _SEPARATOR * scale

    def join(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        if len(parts) == 1:
            return parts[0]
        columns = []
        for k, (part, lut) in enumerate(zip(parts, self.luts)):
            if k:
                columns.append(np.full((self.height, self.gap), colormap.HEADER, np.uint8))
            part = lut[part]
            if part.shape[0] < self.height:
                pad = np.full((self.height - part.shape[0], part.shape[1]), colormap.HEADER,
                              np.uint8)
                part = np.vstack([part, pad])
            columns.append(part)
        return np.hstack(columns)

    def frames(self, steps: Sequence[int]):
        # The same hysteresis as render's GIFs, so a panel is pixel-identical
        # to that run's own GIF at the same frames.
        iterators = [p.frames([p.index(s) for s in steps], self.scale) for p in self.panels]
        for parts in zip(*iterators):
            yield self.join(parts)

    def write_gif(self, fp: BinaryIO, steps: Sequence[int], *, fps: float) -> int:
        writer = GifWriter(fp, self.palette, fps=fps)
        for frame in self.frames(steps):
            writer.add(frame)
        return writer.close()


# --------------------------------------------------------------------------- #
# Checks
# --------------------------------------------------------------------------- #


def run_labels(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short distinct labels for runs: file stems, with parent folders where stems clash.

    Examples
    --------
    >>> run_labels(["runs/tanh.h5", "runs/relu.h5"])
    ['tanh', 'relu']
    >>> run_labels(["a/run.h5", "b/run.h5"])
    ['a/run', 'b/run']
    """
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    labels = [f"{Path(p).parent.name}/{Path(p).stem}" for p in paths]
    if len(set(labels)) == len(labels):
        return labels
    return [f"{k + 1}:{stem}" for k, stem in enumerate(stems)]


def check_aligned(runs: Sequence[Run], labels: Sequence[str],
                  layers: Sequence[str] | None = None) -> list[str]:
    """Check that runs can be compared; return the layer keys to compare.

    Parameters
    ----------
    runs
        Open recordings (at least two).
    labels
        Their labels, used in messages.
    layers
        Layer keys or names to compare; default every layer (then all runs
        must record the same layers).

    Returns
    -------
    list of str
        Layer keys, in the first run's order.

    Raises
    ------
    CompareError
        The probes differ in count or shape, a layer is missing from a run or
        has a different shape, or the runs share no step.
    """
    if len(runs) < 2:
        raise CompareError(f"compare needs at least two runs. Received: {len(runs)} run(s).")
    first = runs[0].probes_x().shape
    for run, label in zip(runs[1:], labels[1:]):
        shape = run.probes_x().shape
        if shape != first:
            raise CompareError(
                f"The runs' probes do not line up: {labels[0]} has {first[0]} probes of shape "
                f"{first[1:]}, {label} has {shape[0]} of shape {shape[1:]}. Compare runs "
                "recorded with the same probes (e.g. the same one_per_class(x_test, y_test)).")
    if layers is None:
        wanted = [layer.key for layer in runs[0].layers]
        keysets = [{layer.key for layer in run.layers} for run in runs]
        if any(keys != keysets[0] for keys in keysets[1:]):
            common = [k for k in wanted if all(k in keys for keys in keysets)]
            detail = "; ".join(f"{label}: {', '.join(layer.key for layer in run.layers)}"
                               for run, label in zip(runs, labels))
            raise CompareError(
                f"The runs' layers do not line up ({detail}). Choose layers all runs "
                f"recorded with layers=/--layers: "
                f"{', '.join(common) if common else 'none are shared'}.")
    else:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        if not wanted:
            raise CompareError("layers is empty: name at least one layer, or pass None for all.")
    keys = []
    for name in wanted:
        infos = []
        for run, label in zip(runs, labels):
            try:
                infos.append(run.layer(name))
            except KeyError:
                known = ", ".join(layer.key for layer in run.layers)
                raise CompareError(f"The runs' layers do not line up: {label} has no layer "
                                   f"{name!r} (it recorded: {known}).") from None
        for info, label in zip(infos[1:], labels[1:]):
            if info.shape != infos[0].shape:
                raise CompareError(
                    f"The runs' layers do not line up: {name} has shape {infos[0].shape} in "
                    f"{labels[0]} but {info.shape} in {label}. Compare layers of the same "
                    "shape (same architecture and input size).")
        if infos[0].key not in keys:
            keys.append(infos[0].key)
    return keys


def common_steps(runs: Sequence[Run], labels: Sequence[str]) -> np.ndarray:
    """The steps every run has a snapshot at (the frames of a comparison).

    Raises
    ------
    CompareError
        When no step is shared.
    """
    steps = runs[0].steps
    for run in runs[1:]:
        steps = np.intersect1d(steps, run.steps)
    if steps.size == 0:
        ranges = ", ".join(
            f"{label}: {len(run.steps)} snapshots" +
            (f" at steps {run.steps[0]}..{run.steps[-1]}" if len(run.steps) else "")
            for run, label in zip(runs, labels))
        raise CompareError(f"The runs share no recorded step ({ranges}); frames are aligned "
                           "by step, so there is nothing to show side by side.")
    return steps.astype(np.int64)


# --------------------------------------------------------------------------- #
# The command
# --------------------------------------------------------------------------- #


def compare(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None, *,
            labels: Sequence[str] | None = None, layers: Sequence[str] | str | None = None,
            max_frames: int | None = None, fps: float = 10.0, scale: int = 1,
            max_channels: int | None = 32,
            value_range: tuple[float, float] | None = None,
            notes: Callable[[str], None] | None = None) -> list[Path]:
    """Side-by-side GIFs of the same layers of several runs, and their curves on one plot.

    Parameters
    ----------
    paths
        Two or more recordings.
    out_dir
        Output directory (created if needed; default
        ``outputs/compare_<run>_<run>.../``). Writes ``<layer>.gif`` (frames
        at the steps all runs share), ``<layer>.png`` (the last shared step)
        and ``curves.png``.
    labels
        One label per run for the panels and legends; default the file stems.
    layers
        Layer keys or names to compare; default all (all runs must then
        record the same layers).
    max_frames
        At most this many frames per GIF (first and last shared step kept).
    fps, scale, max_channels, value_range
        As in :func:`layerwatch.render`.
    notes
        Called with one line per thing worth telling (the alignment chosen,
        probes that differ in value); without it nothing is printed.

    Returns
    -------
    list of pathlib.Path
        The files written.

    Raises
    ------
    CompareError
        The runs' layers, probes or steps do not line up.
    layerwatch.store.RecordingError
        A file is missing, foreign or damaged.
    ValueError
        A bad option.

    Examples
    --------
    >>> compare(["runs/tanh.h5", "runs/relu.h5"], "outputs/tanh_vs_relu")  # doctest: +SKIP
    [PosixPath('outputs/tanh_vs_relu/conv1.gif'), ...]
    """
    paths = [os.fspath(p) for p in paths]
    if len(paths) < 2:
        raise CompareError(f"compare needs at least two runs. Received: {len(paths)} run(s).")
    out = compare_out_dir(run_labels(paths)) if out_dir is None else Path(out_dir)
    if labels is None:
        labels = run_labels(paths)
    elif len(labels) != len(paths):
        raise ValueError(f"Give one label per run: {len(paths)} runs. "
                         f"Received: {len(labels)} labels.")
    labels = [str(label) for label in labels]
    check_options(max_frames=max_frames, fps=fps, scale=scale, max_channels=max_channels)
    say = notes or (lambda text: None)
    written: list[Path] = []
    with ExitStack() as stack:
        runs = [stack.enter_context(open_run(p)) for p in paths]
        keys = check_aligned(runs, labels, layers)
        steps = common_steps(runs, labels)
        counts = ", ".join(f"{label} {len(run.steps)}" for run, label in zip(runs, labels))
        say(f"Frames aligned on the {len(steps)} steps all runs recorded "
            f"(intersection; snapshots per run: {counts}).")
        _note_probe_differences(runs, labels, say)
        steps = steps[select_frames(len(steps), max_frames=max_frames)]
        out.mkdir(parents=True, exist_ok=True)
        longest = max(labels, key=len)
        sample = f"{longest}  step {int(steps.max())}"
        stems = file_stems([runs[0].layer(key).layer_name or key for key in keys])
        for key, stem in zip(keys, stems):
            panels = [LayerPanel(run, run.layer(key), max_channels=max_channels,
                                 value_range=value_range, label=label, caption_sample=sample)
                      for run, label in zip(runs, labels)]
            for panel, label in zip(panels, labels):
                if panel.measured_range:
                    say(f"{key} in {label}: colour range ±{panel.vmax:.3g} ({ROBUST_PERCENTILE}th "
                        "percentile of |activation|; set --range for one range across runs).")
            joined = _SideBySide(panels, scale)
            gif_path = out / f"{stem}.gif"
            tmp = out / f".{stem}.gif.tmp"
            try:
                with open(tmp, "wb") as fp:
                    joined.write_gif(fp, steps.tolist(), fps=fps)
                os.replace(tmp, gif_path)
            finally:
                if tmp.exists():
                    tmp.unlink()
            written.append(gif_path)
            still = out / f"{stem}.png"
            write_still(still, next(joined.frames([int(steps[-1])])), joined.palette)
            written.append(still)
        curves = out / "curves.png"
        if write_compare_curves(runs, labels, curves):
            written.append(curves)
        else:
            say("curves.png not written: no metric is logged in every run.")
    return written


def _note_probe_differences(runs: Sequence[Run], labels: Sequence[str],
                            say: Callable[[str], None]) -> None:
    first = runs[0].probes_x()
    for run, label in zip(runs[1:], labels[1:]):
        other = run.probes_x()
        same = np.array_equal(first, other) or np.allclose(
            first.astype(np.float64), other.astype(np.float64), equal_nan=True)
        if not same:
            message = (f"The probes of {label} differ in value from those of {labels[0]}: "
                       "columns show different inputs (each panel's top row shows its own).")
            say(message)
            warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------- #
# Curves
# --------------------------------------------------------------------------- #


def write_compare_curves(runs: Sequence[Run], labels: Sequence[str],
                         path: str | os.PathLike) -> bool:
    """Overlay the runs' training curves: one panel per metric, one colour per run.

    Train values per step are drawn faint with a smoothed line; validation
    values are markers at the step their epoch ended.

    Returns
    -------
    bool
        False (nothing written) when no metric is logged in every run.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    from layerwatch.rendering.curves import base_name, smooth, train_column

    batches = [run.metrics("batch") for run in runs]
    epochs = [run.metrics("epoch") for run in runs]

    def names_of(b, e) -> set[str]:
        return {base_name(n) for n in list(b.names) + list(e.names)}

    shared = set.intersection(*(names_of(b, e) for b, e in zip(batches, epochs)))
    shared.discard("learning_rate")
    shared.discard("lr")
    order = sorted(shared, key=lambda n: (n != "loss", "acc" not in n, n))
    if not order:
        return False
    cols = 1 if len(order) == 1 else 2
    rows = -(-len(order) // cols)
    fig = Figure(figsize=(5.2 * cols, 3.5 * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, order):
        for k, (batch, epoch, label) in enumerate(zip(batches, epochs, labels)):
            color = f"C{k % 10}"
            column, _ = train_column(batch, name)
            if column is not None:
                steps, values = batch.get(column)
                keep = np.isfinite(values)
                steps, values = steps[keep], values[keep]
                if values.size:
                    ax.plot(steps, values, color=color, alpha=0.2, lw=0.8)
                    ax.plot(steps, smooth(values), color=color, lw=1.8, label=f"{label}")
            if "val_" + name in epoch.names:
                steps, values = epoch.get("val_" + name)
                ax.plot(steps, values, ls="none", marker="o", ms=6, color=color,
                        markeredgecolor="white", label=f"{label} validation", zorder=3)
        ax.set_xlabel("training step")
        ax.set_ylabel(name.replace("_", " "))
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.grid(alpha=0.25)
        ax.legend(fontsize=8, frameon=False)
    for ax in axes[len(order):]:
        ax.set_visible(False)
    fig.suptitle(" vs ".join(labels) + ": training curves", fontsize=11)
    fig.savefig(path, format="png")
    return True
