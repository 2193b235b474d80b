"""``curves.png``: the training curves of a recording, drawn with matplotlib (Agg)."""

from __future__ import annotations

import os

import numpy as np

from layerwatch.store import Metrics, Run
from layerwatch.store.schema import RUNNING, RUNNING_MEAN

_ACCURACY = ("accuracy", "acc")
_LEARNING_RATE = ("learning_rate", "lr")


def smooth(values: np.ndarray, *, span: int | None = None) -> np.ndarray:
    """Zero-lag smoothing: a bias-corrected exponential moving average run
    forwards and then backwards, so the smoothed line does not trail the data.

    ``span`` defaults to about a twentieth of the points, so the smoothing
    looks the same for short and long runs.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size < 3:
        return values.copy()
    span = max(1, values.size // 20) if span is None else span
    return _ema(_ema(values, span)[::-1], span)[::-1]


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(values)
    acc = weight = 0.0
    for i, v in enumerate(values):
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = acc / weight
    return out


def base_name(name: str) -> str:
    """The metric a logged column belongs to: ``val_loss``, ``loss_running_mean`` → ``loss``."""
    name = name[4:] if name.startswith("val_") else name
    for suffix in (RUNNING_MEAN, RUNNING):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def train_column(batch: Metrics, name: str) -> tuple[str | None, bool]:
    """The batch column to draw for metric ``name`` and whether it holds each
    step's own value (else Keras' epoch-so-far value, which restarts each epoch)."""
    if name in batch.names:
        return name, True
    for suffix in (RUNNING, RUNNING_MEAN):
        if name + suffix in batch.names:
            return name + suffix, False
    return None, False
def is_accuracy(name: str) -> bool:
    """Whether a metric name is accuracy-like (``accuracy``, ``acc``, ``top_k_accuracy`` …)."""
    return any(name == a or name.endswith("_" + a) for a in _ACCURACY)


def _panels(batch: Metrics, epoch: Metrics) -> list[str]:
    """Base metric names, one panel each: loss, accuracy-like, others, learning rate last."""
    names: list[str] = []
    for name in list(batch.names) + list(epoch.names):
        base = base_name(name)
        if base not in names:
            names.append(base)

    def order(name: str) -> tuple[int, int]:
        if name == "loss":
            return 0, 0
        if name in _LEARNING_RATE:
            return 3, 0
        if is_accuracy(name):
            return 1, names.index(name)
        return 2, names.index(name)

    return sorted(names, key=order)


def _finite(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(values)
    return steps[keep], values[keep]


def write_curves(run: Run, path: str | os.PathLike) -> bool:
    """Draw loss, accuracy and every other logged metric against the training step.

    Each step's own training value is drawn faint with a smoothed line over
    it (metrics that are not means, which have no per-step value, show Keras'
    epoch-so-far value, smoothed within epochs); validation values (logged
    per epoch) are markers at the step their epoch ended; dotted vertical
    lines mark epoch boundaries. Each metric has its own panel, the learning
    rate last.

    Parameters
    ----------
    run
        An open recording.
    path
        The PNG to write.

    Returns
    -------
    bool
        False (and nothing written) when the recording holds no metric.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    batch, epoch = run.metrics("batch"), run.metrics("epoch")
    panels = _panels(batch, epoch)
    if not panels:
        return False
    subtitle = ""
    for name in [p for p in panels if p in _LEARNING_RATE and p in batch.names]:
        _, values = _finite(*batch.get(name))
        if values.size and np.all(values == values[0]) and len(panels) > 1:
            panels.remove(name)  # a flat line says less than its value does
            subtitle = f" (constant {name.replace('_', ' ')} {values[0]:.3g})"
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.0 * cols, 3.4 * rows), dpi=110, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    boundaries = _epoch_boundaries(run, epoch)
    for ax, name in zip(axes, panels):
        _draw_panel(ax, name, batch, epoch, boundaries)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    title = run.attrs.get("model_name") or os.path.splitext(os.path.basename(run.path))[0]
    fig.suptitle(f"{title}: training curves{subtitle}", fontsize=11)
    fig.savefig(path, format="png")
    return True


def _epoch_boundaries(run: Run, epoch: Metrics) -> np.ndarray:
    """Steps at which an epoch ended (all but the last)."""
    if epoch.steps.size:
        ends = np.unique(epoch.steps)
        return ends[:-1]
    epochs, steps = run.epochs, run.steps
    change = np.flatnonzero(np.diff(epochs) != 0)
    return steps[change]


def _draw_panel(ax, name: str, batch: Metrics, epoch: Metrics, boundaries: np.ndarray) -> None:
    color = "C0"
    drew_train = False
    column, per_step = train_column(batch, name)
    if column is not None:
        steps, values = _finite(*batch.get(column))
        if values.size:
            ax.plot(steps, values, color=color, alpha=0.3, linewidth=0.8,
                    label=None if name in _LEARNING_RATE else
                    f"train {name}, " + ("each step" if per_step else "epoch so far"))
            # A running value restarts each epoch: smoothed within epochs then.
            cuts = [] if per_step else np.searchsorted(steps, boundaries, side="right")
            label = name.replace("_", " ") if name in _LEARNING_RATE else "smoothed"
            for k, (s_part, v_part) in enumerate(zip(np.split(steps, cuts),
                                                      np.split(values, cuts))):
                if v_part.size:
                    ax.plot(s_part, smooth(v_part), color=color, linewidth=1.8,
                            label=label if k == 0 else None)
            drew_train = True
    if not drew_train and name in epoch.names:  # only per-epoch values were logged
        steps, values = _finite(*epoch.get(name))
        if values.size:
            ax.plot(steps, values, color=color, marker="o", markersize=3, linewidth=1.5,
                    label=f"train {name} (epoch)")
    val = "val_" + name
    if val in epoch.names:
        steps, values = _finite(*epoch.get(val))
        if values.size:
            ax.plot(steps, values, linestyle="none", marker="o", markersize=6, color="C3",
                    markeredgecolor="white", label=f"validation {name}", zorder=3)
    for i, step in enumerate(boundaries):
        ax.axvline(step, color="0.6", linestyle=":", linewidth=1.0, zorder=0,
                   label="epoch end" if i == 0 else None)
    if name in _LEARNING_RATE and _spans_decades(batch, name):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(name.replace("_", " "))
    ax.set_title(name.replace("_", " "), fontsize=10)
    ax.grid(True, alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, frameon=False)


def _spans_decades(batch: Metrics, name: str) -> bool:
    if name not in batch.names:
        return False
    _, values = _finite(*batch.get(name))
    return bool(values.size) and bool((values > 0).all()) and values.max() / values.min() > 10
