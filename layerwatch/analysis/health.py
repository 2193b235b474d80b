"""Health signals: saturated units and dead channels, per layer, over training.

Two things go wrong with conv layers silently, and both show in the recorded
activations:

*Saturation.* A unit stuck at the flat end of its nonlinearity passes no
gradient. For tanh-like activations (natural range symmetric about 0, e.g.
tanh, softsign: ``value_range == (-1, 1)``) a unit counts as saturated when
``|a| > 0.99`` of the bound; for ReLU-like ones (relu, relu6, a ReLU layer, or
any activation whose range starts at 0) when it is exactly 0. Other
activations (linear, elu, gelu, leaky ReLU, …) have no flat end: their
saturated share is NaN.

*Dead channels.* A channel whose value at every position is the same for every
probe carries no information about the input — whether it sits at 0 (a dead
ReLU) or at ±1 (a saturated tanh).

This module is pure numpy over :class:`layerwatch.store.Run`; the figure uses
matplotlib (Agg, no pyplot).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from layerwatch.text import shorten

#: |a| above this fraction of the bound counts as saturated (tanh-like).
SATURATION_LEVEL = 0.99
#: A channel "ends saturated" when at least this share of its units is saturated.
CHANNEL_SATURATED_SHARE = 0.99
#: Activations whose flat end is exactly 0.
RELU_LIKE = frozenset({"relu", "relu6", "hard_relu", "threshold", "relu_6"})
_DEAD_ATOL = 1e-6  # relative to the layer's scale; float16 storage is exact for constants


@dataclass(frozen=True)
class _Kind:
    """How saturation is measured for one layer."""

    name: str                  #: "tanh-like", "relu-like" or "unbounded"
    low: float = 0.0
    high: float = 0.0

    def describe(self) -> str:
        if self.name == "tanh-like":
            bound = "" if self.high == 1.0 else f"·{self.high:g}"
            return f"|a| > {SATURATION_LEVEL:g}{bound}"
        if self.name == "relu-like":
            return f"a = {self.low:g}"
        return "not defined"


def saturation_kind(layer: Any) -> _Kind:
    """Classify a :class:`layerwatch.store.LayerInfo` for saturation counting."""
    activation = str(getattr(layer, "activation", "")).lower()
    value_range = getattr(layer, "value_range", None)
    if activation in RELU_LIKE:
        return _Kind("relu-like", 0.0, value_range[1] if value_range else float("inf"))
    if value_range is not None:
        low, high = value_range
        if low == 0.0:
            return _Kind("relu-like", 0.0, high)
        if low == -high:
            return _Kind("tanh-like", low, high)
    return _Kind("unbounded")


def saturated_mask(a: np.ndarray, kind: _Kind) -> np.ndarray | None:
    """Boolean mask of saturated units of one snapshot (``None`` when undefined)."""
    if kind.name == "tanh-like":
        with np.errstate(invalid="ignore"):
            return np.abs(a) > SATURATION_LEVEL * kind.high
    if kind.name == "relu-like":
        return a == kind.low
    return None


def dead_channels(a: np.ndarray, channel_axis: int) -> np.ndarray | None:
    """Which channels are constant across probes, for one snapshot.

    Parameters
    ----------
    a
        ``(probes, *layer shape)``.
    channel_axis
        Axis of the layer shape (not counting probes) holding channels.

    Returns
    -------
    numpy.ndarray or None
        ``(channels,)`` bool: True where, at every position, the channel's
        value is the same for all probes. ``None`` with fewer than 2 probes.
    """
    if a.shape[0] < 2:
        return None
    a = np.moveaxis(np.asarray(a, dtype=np.float32), channel_axis + 1, 1)
    a = a.reshape(a.shape[0], a.shape[1], -1)              # (probes, channels, positions)
    with np.errstate(invalid="ignore"):
        # NaN propagates into ``spread`` and compares False: a diverged channel
        # is not called dead.
        spread = (a.max(axis=0) - a.min(axis=0)).max(axis=1)   # (channels,)
        scale = np.maximum(1.0, np.abs(a).max(axis=(0, 2)))
        return spread <= _DEAD_ATOL * scale


def channel_saturation(a: np.ndarray, channel_axis: int, kind: _Kind) -> np.ndarray | None:
    """Share of saturated units per channel for one snapshot (``None`` when undefined)."""
    mask = saturated_mask(a, kind)
    if mask is None:
        return None
    mask = np.moveaxis(mask, channel_axis + 1, 1)
    return mask.reshape(mask.shape[0], mask.shape[1], -1).mean(axis=(0, 2))


@dataclass
class LayerHealth:
    """One layer's health over training (see :class:`HealthResult`)."""

    key: str
    kind: str                      #: "tanh-like", "relu-like" or "unbounded"
    rule: str                      #: what counts as saturated, e.g. "|a| > 0.99·1"
    channels: int
    saturated: np.ndarray          #: (T,) share of saturated units (NaN if undefined)
    dead: np.ndarray               #: (T,) number of dead channels
    final_dead: list[int] = field(default_factory=list)
    final_saturated: list[int] = field(default_factory=list)  #: channels ≥ 99 % saturated


@dataclass
class HealthResult:
    """Health signals of a run. Returned by :func:`health`."""

    path: str
    steps: np.ndarray
    layers: list[LayerHealth]
    probe_count: int

    def findings(self) -> list[str]:
        """Lines naming the layers/channels that end saturated or dead (empty if none)."""
        return _findings(self.layers)


def _analyse(a: np.ndarray, layer: Any, kind: _Kind) -> tuple[float, np.ndarray | None,
                                                                np.ndarray | None]:
    mask = saturated_mask(a, kind)
    share = float(mask.mean()) if mask is not None and mask.size else float("nan")
    dead = dead_channels(a, layer.channel_axis)
    per_channel = channel_saturation(a, layer.channel_axis, kind)
    return share, dead, per_channel


def _final_lists(dead: np.ndarray | None, per_channel: np.ndarray | None
                 ) -> tuple[list[int], list[int]]:
    final_dead = [] if dead is None else np.flatnonzero(dead).tolist()
    final_sat = [] if per_channel is None else \
        np.flatnonzero(per_channel >= CHANNEL_SATURATED_SHARE).tolist()
    return final_dead, final_sat


def health_of_run(run: Any, *, layers: Sequence[str] | None = None,
                  indices: Sequence[int] | None = None) -> HealthResult:
    """Health signals of an open :class:`layerwatch.store.Run` (see :func:`health`)."""

    n = run.num_snapshots
    if n == 0:
        raise ValueError(f"{run.path} holds no snapshot yet; nothing to measure.")
    picks = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64)
    steps = run.steps[picks]
    out = []
    for key in [layer.key for layer in run.select_layers(layers)]:
        info = run.layer(key)
        kind = saturation_kind(info)
        channels = info.shape[info.channel_axis] if info.shape else 1
        saturated = np.full(len(picks), np.nan)
        dead_count = np.full(len(picks), np.nan)
        dead = per_channel = None
        for i, a in enumerate(run.iter_activations(key, picks.tolist())):
            saturated[i], dead, per_channel = _analyse(a, info, kind)
            if dead is not None:
                dead_count[i] = int(dead.sum())
        final_dead, final_sat = _final_lists(dead, per_channel)
        out.append(LayerHealth(key=key, kind=kind.name, rule=kind.describe(),
                               channels=int(channels), saturated=saturated, dead=dead_count,
                               final_dead=final_dead, final_saturated=final_sat))
    return HealthResult(path=str(run.path), steps=steps, layers=out,
                        probe_count=int(run.probes_x().shape[0]))


def health(path: str | os.PathLike, *, layers: Sequence[str] | None = None) -> HealthResult:
    """Saturation and dead channels of every recorded layer over training.

    Parameters
    ----------
    path
        A layerwatch recording.
    layers
        Layer keys (or names); default all.

    Returns
    -------
    HealthResult

    Raises
    ------
    layerwatch.store.RecordingError
        The file is missing, foreign or damaged.
    ValueError
        An unknown layer, or no snapshot.
    """
    from layerwatch.store import open_run

    with open_run(path) as run:
        return health_of_run(run, layers=layers)


def health_lines(run: Any) -> list[str]:
    """Lines for ``layerwatch info``: layers/channels that end saturated or dead.

    Reads only the final snapshot, so it is cheap on long runs.

    Parameters
    ----------
    run
        An open :class:`layerwatch.store.Run`.

    Returns
    -------
    list of str
        Indented lines, starting with a ``health (final step N):`` line;
        empty when the run holds no snapshot.
    """
    n = run.num_snapshots
    if n == 0:
        return []
    result = health_of_run(run, indices=[n - 1])
    step = int(result.steps[-1])
    findings = result.findings()
    if result.probe_count < 2:
        return [f"  health (final step {step}): saturation only; dead channels need "
                "at least 2 probes"] + ["    " + line for line in findings]
    if not findings:
        return [f"  health (final step {step}): no layer ends with dead or saturated channels"]
    return [f"  health (final step {step}):"] + ["    " + line for line in findings]


def _channel_list(channels: list[int], limit: int = 12) -> str:
    text = ", ".join(str(c) for c in channels[:limit])
    return text + (f", … ({len(channels) - limit} more)" if len(channels) > limit else "")


def _findings(layers: list[LayerHealth]) -> list[str]:
    lines = []
    for layer in layers:
        parts = []
        if layer.final_dead:
            parts.append(f"{len(layer.final_dead)} of {layer.channels} channels dead "
                         f"(constant across probes): {_channel_list(layer.final_dead)}")
        saturated_only = [c for c in layer.final_saturated if c not in layer.final_dead]
        if saturated_only:
            parts.append(f"{len(saturated_only)} of {layer.channels} channels saturated "
                         f"(≥{CHANNEL_SATURATED_SHARE:.0%} of units {layer.rule}): "
                         f"{_channel_list(saturated_only)}")
        share = layer.saturated[-1] if len(layer.saturated) else float("nan")
        if parts:
            tail = "" if np.isnan(share) else f"; {share:.1%} of all units saturated"
            lines.append(f"{shorten(layer.key)}: " + "; ".join(parts) + tail)
    return lines


def plot_health(result: HealthResult, path: str | os.PathLike, *, dpi: int = 110) -> str:
    """Write ``health.png``: saturated share and dead-channel share per layer over training.

    Returns
    -------
    str
        The path written.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(9.0, 6.0), dpi=dpi, layout="constrained")
    sat_ax, dead_ax = fig.subplots(2, 1, sharex=True)
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(len(result.layers), 1)))
    steps = result.steps
    drew_sat = False
    rules = {layer.rule for layer in result.layers if layer.kind != "unbounded"}
    tops = [1.0, 1.0]  # percent; tiny shares stay readable instead of hugging 0
    for color, layer in zip(colors, result.layers):
        if not np.all(np.isnan(layer.saturated)):
            label = layer.key if len(rules) == 1 else f"{layer.key} ({layer.rule})"
            sat_ax.plot(steps, 100 * layer.saturated, color=color, lw=1.6, label=label)
            tops[0] = max(tops[0], 100 * float(np.nanmax(layer.saturated)))
            drew_sat = True
        dead = 100 * layer.dead / max(layer.channels, 1)
        dead_ax.plot(steps, dead, color=color, lw=1.6, label=layer.key)
        if not np.all(np.isnan(dead)):
            tops[1] = max(tops[1], float(np.nanmax(dead)))
    sat_ax.set_ylabel("saturated units (%)")
    sat_ax.set_title("Saturated units: tanh-like |a| > 0.99 of the bound, ReLU-like a = 0",
                     fontsize=10)
    if drew_sat:
        sat_ax.legend(fontsize=8, loc="best")
    else:
        sat_ax.text(0.5, 0.5, "no layer with a bounded or ReLU-like activation",
                    ha="center", va="center", transform=sat_ax.transAxes, color="0.4")
    dead_ax.set_ylabel("dead channels (%)")
    dead_ax.set_xlabel("training step")
    dead_ax.set_title(f"Dead channels: constant across all {result.probe_count} probes",
                      fontsize=10)
    dead_ax.legend(fontsize=8, loc="best")
    for ax, top in zip((sat_ax, dead_ax), tops):
        top = min(100.0, 1.15 * top)
        ax.set_ylim(-0.03 * top, top)
        ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path)
    return os.fspath(path)
