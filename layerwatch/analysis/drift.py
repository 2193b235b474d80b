"""Representation drift: how much each layer still changes, measured by linear CKA.

Linear centred kernel alignment (Kornblith et al., ICML 2019) compares two
representations of the same ``n`` probes, ``X`` (n × p) and ``Y`` (n × q),
with columns centred::

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F · ‖YᵀY‖_F)

It is 1 for representations equal up to an orthogonal transform and an
isotropic scaling, and near 0 for unrelated ones. This module computes it in
the equivalent n × n Gram form — with ``K = XXᵀ`` and ``L = YYᵀ`` centred,
``CKA = ⟨K, L⟩_F / (‖K‖_F ‖L‖_F)`` — so a layer with thousands of features per
probe costs one ``n × n`` matrix per snapshot.

For every recorded layer, :func:`drift` compares each snapshot with the final
one ("CKA to final") and with the one before it ("consecutive"), streaming
snapshots from the file one at a time. A layer has *settled* at the first step
from which its CKA to the final snapshot stays at or above a threshold (0.9).

This module is pure numpy; the file is read through :mod:`layerwatch.store`
and the figure drawn with matplotlib's Agg backend, both imported on use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

#: Default CKA-to-final level a layer must stay at to count as settled.
SETTLED_THRESHOLD = 0.9
#: Fewer probes than this make CKA noisy; the output says so.
FEW_PROBES = 20


# --------------------------------------------------------------------------- #
# CKA
# --------------------------------------------------------------------------- #


def centered_gram(x: np.ndarray) -> np.ndarray | None:
    """The centred linear Gram matrix of one representation.

    Parameters
    ----------
    x
        ``(n, ...)``: one row of features per probe (trailing axes are
        flattened).

    Returns
    -------
    numpy.ndarray or None
        ``(n, n)`` float64 ``Xc Xcᵀ`` with ``Xc`` the column-centred features,
        or ``None`` when CKA is undefined for ``x``: every feature is constant
        across the probes (up to rounding), a value is not finite, or there
        are fewer than two probes.
    """
    x = np.asarray(x)
    if x.ndim < 1 or x.shape[0] < 2:
        return None
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    if not np.all(np.isfinite(x)):
        return None
    xc = x - x.mean(axis=0, keepdims=True)
    spread = float(np.einsum("ij,ij->", xc, xc))
    scale = float(np.einsum("ij,ij->", x, x))
    # Rounding in the mean leaves ~1e-32 of a constant column; anything that
    # small relative to the values themselves is no variation at all.
    if spread <= 1e-20 * scale or spread == 0.0:
        return None
    return xc @ xc.T


def center_gram(k: np.ndarray) -> np.ndarray | None:
    """Centre an uncentred linear Gram matrix ``K = XXᵀ`` into ``Xc Xcᵀ``.

    ``H K H`` with ``H = I - 11ᵀ/n`` equals the Gram matrix of the
    column-centred features, so recordings can keep ``n × n`` Grams instead of
    wide activations. Returns None where :func:`centered_gram` would.
    """
    k = np.asarray(k, dtype=np.float64)
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] < 2 \
            or not np.all(np.isfinite(k)):
        return None
    kc = k - k.mean(axis=0, keepdims=True)
    kc = kc - kc.mean(axis=1, keepdims=True)
    if np.trace(kc) <= 1e-12 * max(np.trace(k), 1e-300):
        return None  # no variation across the inputs (up to float32 rounding)
    return kc


def cka_from_grams(k: np.ndarray | None, l: np.ndarray | None) -> float:
    """Linear CKA from two centred Gram matrices (see :func:`centered_gram`).

    Returns NaN when either is ``None`` (CKA undefined).
    """
    if k is None or l is None:
        return float("nan")
    hsic_kl = float(np.einsum("ij,ij->", k, l))
    norm = float(np.sqrt(np.einsum("ij,ij->", k, k) * np.einsum("ij,ij->", l, l)))
    if not norm > 0:
        return float("nan")
    return float(np.clip(hsic_kl / norm, 0.0, 1.0))


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA between two representations of the same probes.

    Parameters
    ----------
    x, y
        ``(n, ...)`` arrays with the same first dimension (probes); trailing
        axes are flattened into features and may differ between ``x`` and ``y``.

    Returns
    -------
    float
        In [0, 1]; NaN when undefined (a representation is constant across
        probes, holds a non-finite value, or ``n < 2``).

    Raises
    ------
    ValueError
        The two arrays describe different numbers of probes.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(50, 8))
    >>> round(linear_cka(x, 3 * x), 6)
    1.0
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[:1] != y.shape[:1]:
        raise ValueError("Both representations must describe the same probes. Received: "
                         f"x.shape={x.shape}, y.shape={y.shape}.")
    return cka_from_grams(centered_gram(x), centered_gram(y))


# --------------------------------------------------------------------------- #
# Drift over a run
# --------------------------------------------------------------------------- #


@dataclass
class DriftResult:
    """Per-layer CKA over a run. Returned by :func:`drift`.

    Attributes
    ----------
    path
        The recording analysed.
    steps
        ``(T,)`` training step of each snapshot analysed.
    layers
        Layer keys, in the order of the rows below.
    to_final
        ``(L, T)`` CKA of each snapshot with the layer's final snapshot.
    consecutive
        ``(L, T)`` CKA of each snapshot with the one before it; column 0 is NaN.
    probe_count
        How many probes every CKA value rests on.
    probe_source
        ``"analysis"`` (the recording's extra analysis probes) or ``"main"``
        (the rendered probes).
    threshold
        The CKA-to-final level used for :attr:`settled`.
    settled
        Layer key → the first step from which CKA to final stays ≥ ``threshold``
        (``None`` when undefined, e.g. the layer ends constant).
    final_change
        Layer key → ``1 - CKA`` between the last two snapshots (NaN with one
        snapshot or when undefined).
    settled_relative
        Layer key → the first step from which the layer has stayed at least
        ``threshold`` of the way from its step-0 CKA to 1, i.e.
        ``(CKA_t - CKA_0) / (1 - CKA_0) ≥ threshold``. With few probes or
        input-like layers CKA to final starts high (often above 0.9 already at
        step 0); this says when most of the change that did happen was done.
    """

    path: str
    steps: np.ndarray
    layers: list[str]
    to_final: np.ndarray
    consecutive: np.ndarray
    probe_count: int
    probe_source: str
    threshold: float = SETTLED_THRESHOLD
    settled: dict[str, int | None] = field(default_factory=dict)
    final_change: dict[str, float] = field(default_factory=dict)
    settled_relative: dict[str, int | None] = field(default_factory=dict)

    def probes_note(self) -> str:
        """One sentence: how many probes the numbers rest on, and how reliable that is."""
        source = ("analysis probes" if self.probe_source == "analysis"
                  else "rendered probes")
        note = f"CKA rests on {self.probe_count} {source}"
        if self.probe_count < FEW_PROBES:
            note += (" (few: values are noisy; record more with "
                     "LayerWatch(..., analysis_probes=...))")
        return note + "."

    def table(self) -> str:
        """The settled table as aligned text (one line per layer)."""
        header = ("layer", "CKA@0", f"settled (≥{self.threshold:g})",
                  f"{self.threshold:.0%} of drift done", "last change (1-CKA)")
        rows = [header]
        for row in self.rows():
            rows.append((row["layer"], _fmt(row["cka_first"], ".3f"), _fmt_step(row["settled"]),
                         _fmt_step(row["settled_relative"]), _fmt(row["final_change"], ".2e")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        return "\n".join("  ".join(f"{cell:<{w}}" if i == 0 else f"{cell:>{w}}"
                                   for i, (cell, w) in enumerate(zip(r, widths)))
                         for r in rows)

    def rows(self) -> list[dict[str, Any]]:
        """The settled table as dicts.

        Keys: ``layer``, ``cka_first`` (CKA of the first snapshot with the
        final one), ``settled``, ``settled_relative`` and ``final_change``.
        """
        return [{"layer": key,
                 "cka_first": float(self.to_final[row, 0]) if self.to_final.shape[1]
                 else float("nan"),
                 "settled": self.settled.get(key),
                 "settled_relative": self.settled_relative.get(key),
                 "final_change": self.final_change.get(key, float("nan"))}
                for row, key in enumerate(self.layers)]


def _fmt(value: float, spec: str) -> str:
    return "n/a" if value is None or np.isnan(value) else format(value, spec)


def _fmt_step(step: int | None) -> str:
    return "n/a" if step is None else str(step)


def settled_step(steps: np.ndarray, to_final: np.ndarray, *,
                 threshold: float = SETTLED_THRESHOLD) -> int | None:
    """The first step from which CKA to final stays at or above ``threshold``.

    Parameters
    ----------
    steps
        ``(T,)`` step of each snapshot.
    to_final
        ``(T,)`` CKA of each snapshot with the final one; NaN counts as below.
    threshold
        The level to stay at.

    Returns
    -------
    int or None
        ``None`` when even the last value is below (or NaN).

    Examples
    --------
    >>> settled_step(np.array([0, 10, 20, 30]), np.array([0.2, 0.95, 0.8, 1.0]))
    30
    """
    values = np.asarray(to_final, dtype=np.float64)
    below = ~(values >= threshold)  # NaN is below
    if len(values) == 0 or below[-1]:
        return None
    failing = np.flatnonzero(below)
    first = int(failing[-1]) + 1 if failing.size else 0
    return int(np.asarray(steps)[first])


@dataclass
class _Source:
    """Which snapshots to analyse: the main probes or the analysis probes."""

    name: str
    steps: np.ndarray
    probe_count: int
    iterate: Callable[[str, Sequence[int] | None], Iterator[np.ndarray]]
    centre: Callable[[np.ndarray], np.ndarray | None] = centered_gram


def _source(run: Any, probes: str) -> _Source:
    has_analysis = bool(getattr(run, "has_analysis", False))
    if probes not in ("auto", "main", "analysis"):
        raise ValueError("probes must be 'auto', 'main' or 'analysis'. "
                         f"Received: probes={probes!r}")
    if probes == "analysis" and not has_analysis:
        raise ValueError(f"{run.path} holds no analysis probes. Record them with "
                         "LayerWatch(..., analysis_probes=...), or use the main probes "
                         "(probes='auto').")
    if has_analysis and probes != "main":
        return _Source("analysis", np.asarray(run.analysis_steps, dtype=np.int64),
                       int(run.analysis_probe_count), run.iter_analysis_grams, center_gram)
    return _Source("main", np.asarray(run.steps, dtype=np.int64),
                   int(run.probes_x().shape[0]), run.iter_activations)


def drift_of_run(run: Any, *, layers: Sequence[str] | None = None, probes: str = "auto",
                 threshold: float = SETTLED_THRESHOLD) -> DriftResult:
    """Drift of an open :class:`layerwatch.store.Run` (see :func:`drift`)."""
    source = _source(run, probes)
    keys = [layer.key for layer in run.select_layers(layers)]
    recorded = getattr(run, "analysis_layers", None) if source.name == "analysis" else None
    if recorded is not None:  # analysis probes may be recorded for fewer layers
        missing = [k for k in keys if k not in set(recorded)]
        if layers is None:
            keys = [k for k in keys if k not in missing]
        elif missing:
            raise ValueError(f"The analysis probes of {run.path} were not recorded for "
                             f"{', '.join(missing)}; pass probes='main' for those layers.")
        if not keys:
            raise ValueError(f"{run.path} recorded analysis probes for no layer.")
    if source.probe_count < 2:
        raise ValueError(
            f"CKA needs at least 2 probes; {run.path} has {source.probe_count} "
            f"{source.name} probe(s). Record more probes (or analysis_probes=...).")
    steps = source.steps
    t = len(steps)
    if t == 0:
        raise ValueError(f"{run.path} holds no snapshot yet; nothing to measure.")
    to_final = np.full((len(keys), t), np.nan)
    consecutive = np.full((len(keys), t), np.nan)
    for row, key in enumerate(keys):
        final = source.centre(next(iter(source.iterate(key, [t - 1]))))
        previous = None
        for i, snapshot in enumerate(source.iterate(key, range(t))):
            gram = source.centre(snapshot)
            to_final[row, i] = cka_from_grams(gram, final)
            if i > 0:
                consecutive[row, i] = cka_from_grams(previous, gram)
            previous = gram
    result = DriftResult(path=str(run.path), steps=steps, layers=keys, to_final=to_final,
                         consecutive=consecutive, probe_count=source.probe_count,
                         probe_source=source.name, threshold=float(threshold))
    for row, key in enumerate(keys):
        result.settled[key] = settled_step(steps, to_final[row], threshold=threshold)
        result.settled_relative[key] = settled_step(steps, _progress(to_final[row]),
                                                    threshold=threshold)
        last = consecutive[row, -1] if t > 1 else float("nan")
        result.final_change[key] = float(1.0 - last)
    return result


def _progress(to_final: np.ndarray) -> np.ndarray:
    """How far each snapshot is from the first towards the final one, in CKA (0 → 1)."""
    first = to_final[0]
    if not np.isfinite(first):  # undefined at the start: fall back to plain CKA
        return to_final
    if first >= 1.0:
        return np.where(np.isnan(to_final), np.nan, 1.0)
    return (to_final - first) / (1.0 - first)


def drift(path: str | os.PathLike, *, layers: Sequence[str] | None = None,
          probes: str = "auto", threshold: float = SETTLED_THRESHOLD) -> DriftResult:
    """Measure how each layer's representation changes over a recording.

    Parameters
    ----------
    path
        A layerwatch recording.
    layers
        Layer keys (or names) to analyse; default all.
    probes
        ``"auto"`` uses the recording's analysis probes when it has them and
        the rendered probes otherwise; ``"main"`` or ``"analysis"`` force one.
    threshold
        CKA-to-final level for the settled step.

    Returns
    -------
    DriftResult

    Raises
    ------
    layerwatch.store.RecordingError
        The file is missing, foreign or damaged.
    ValueError
        An unknown layer, fewer than two probes, no snapshot, or analysis
        probes requested from a file without them.

    Examples
    --------
    >>> result = drift("runs/mnist_tanh.h5")        # doctest: +SKIP
    >>> result.settled["conv1"]                      # doctest: +SKIP
    57
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1]. Received: threshold={threshold!r}")
    from layerwatch.store import open_run

    with open_run(path) as run:
        return drift_of_run(run, layers=layers, probes=probes, threshold=threshold)


# --------------------------------------------------------------------------- #
# The figure
# --------------------------------------------------------------------------- #


def plot_drift(result: DriftResult, path: str | os.PathLike, *, dpi: int = 110) -> str:
    """Write ``drift.png``: CKA to final per layer, change per step, and a heatmap.

    Three panels share the step axis: each layer's CKA with its final
    snapshot (a dot where it settled), each layer's change between consecutive
    snapshots (``1 - CKA``, log scale), and a layers × steps heatmap of CKA to
    final. The title says how many probes the numbers rest on.

    Parameters
    ----------
    result
        From :func:`drift`.
    path
        The PNG to write.
    dpi
        Resolution.

    Returns
    -------
    str
        The path written.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    steps = result.steps
    n_layers = len(result.layers)
    heat_h = max(1.4, 0.28 * n_layers)
    fig = Figure(figsize=(9.0, 7.6 + heat_h), dpi=dpi, layout="constrained")
    curves_ax, change_ax, heat_ax = fig.subplots(3, 1, height_ratios=[3, 2.2, heat_h])
    fig.suptitle(f"Representation drift: linear CKA per layer\n{result.probes_note()}",
                 fontsize=10)
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, max(n_layers, 1)))
    finite = result.to_final[np.isfinite(result.to_final)]
    low = min(result.threshold, float(finite.min()) if finite.size else 0.0)
    low = max(0.0, low - 0.05 * (1.0 - low) - 0.01)
    for row, key in enumerate(result.layers):
        curves_ax.plot(steps, result.to_final[row], color=colors[row], lw=1.6, label=key)
        settled = result.settled.get(key)
        if settled is not None:
            i = int(np.searchsorted(steps, settled))
            curves_ax.plot([settled], [result.to_final[row, i]], "o", color=colors[row], ms=5)
        change = 1.0 - result.consecutive[row, 1:]
        change_ax.plot(steps[1:], np.clip(change, 1e-7, None), color=colors[row], lw=1.0,
                       label=key)
    curves_ax.axhline(result.threshold, color="0.4", lw=0.8, ls="--",
                      label=f"settled at {result.threshold:g}")
    curves_ax.set_ylim(low, 1.0 + 0.03 * (1.0 - low))
    curves_ax.set_ylabel("CKA to final snapshot")
    curves_ax.set_title("Similarity to the final representation (dot: settled)", fontsize=10)
    curves_ax.grid(alpha=0.3)
    curves_ax.legend(fontsize=8, loc="lower right", ncol=max(1, (n_layers + 6) // 7))
    change_ax.set_yscale("log")
    change_ax.set_ylabel("1 - CKA(previous, this)")
    change_ax.set_title("Change from one snapshot to the next", fontsize=10)
    change_ax.grid(alpha=0.3, which="both")
    if len(steps) < 2:
        change_ax.text(0.5, 0.5, "one snapshot: no change to show", ha="center",
                       va="center", transform=change_ax.transAxes, color="0.4")

    data = np.ma.masked_invalid(result.to_final)
    # Undefined CKA (constant activations) in grey.
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="0.8")
    if len(steps) > 1:
        edges = np.concatenate([[steps[0] - 0.5], (steps[1:] + steps[:-1]) / 2,
                                [steps[-1] + 0.5]])
    else:
        edges = np.array([steps[0] - 0.5, steps[0] + 0.5])
    mesh = heat_ax.pcolormesh(edges, np.arange(n_layers + 1), data, cmap=cmap, vmin=low,
                              vmax=1.0, shading="flat")
    heat_ax.set_yticks(np.arange(n_layers) + 0.5, labels=result.layers, fontsize=8)
    heat_ax.set_ylim(n_layers, 0)
    heat_ax.set_xlabel("training step")
    fig.colorbar(mesh, ax=heat_ax, label="CKA to final", fraction=0.04, pad=0.01)
    for ax in (curves_ax, change_ax):
        ax.set_xlim(edges[0], edges[-1])
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path)
    return os.fspath(path)


def write_drift(path: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                layers: Sequence[str] | None = None, probes: str = "auto",
                threshold: float = SETTLED_THRESHOLD) -> tuple[DriftResult, str]:
    """:func:`drift` of a recording and its figure, ``drift.png`` in ``out_dir``
    (default ``outputs/<run name>/``): what ``layerwatch drift`` does.

    Returns
    -------
    (DriftResult, str)
        The numbers and the path of the figure written.
    """
    from layerwatch.outputs import default_out_dir

    result = drift(path, layers=layers, probes=probes, threshold=threshold)
    out = default_out_dir(path) if out_dir is None else out_dir
    return result, plot_drift(result, os.path.join(out, "drift.png"))

