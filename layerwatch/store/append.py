"""Continuing a recording (resumed training): what must match, and what is dropped.

Every rule for appending lives here: the layers, probes, labels and analysis
probes must be those of the file; a file whose writer died is repaired first;
snapshots after the step training resumes from are dropped.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .closing import Handles, abandon, finish
from .features import FeaturesSpec, check_features_appendable, cut_features, rows_through
from .files import h5_reason, open_for_writing
from .reader import Run, open_run
from .repair import repair_run, steps_after, truncate
from .schema import (ANALYSIS, ANALYSIS_STEPS, FEATURES_STEPS, METRIC_GROUPS, METRICS, STATUS,
                     STATUS_RECORDING, STEPS, LayerSpec, RecordingError)


class AppendError(RecordingError, ValueError):
    """A recording cannot be continued by this run: its layers or probes differ."""


@dataclass(frozen=True)
class Resumed:
    """Where an appended recording stands once it is ready to continue."""

    last_step: int | None      #: the newest snapshot kept
    last_analysis: int | None  #: the newest analysis step kept
    last_features: int | None = None  #: the newest feature-images step kept


def check_appendable(run: Run, layers: Sequence[LayerSpec], probes_x: np.ndarray,
                     probes_y: np.ndarray | None, analysis_probes: int = 0,
                   saliency: bool = False, features: FeaturesSpec | None = None) -> None:
    """Raise :class:`AppendError` unless this run records what ``run`` holds."""
    stored = {layer.key: layer.shape for layer in run.layers}
    wanted = {spec.key: tuple(spec.shape) for spec in layers}
    if stored != wanted:
        raise AppendError(
            f"Cannot append to {run.path}: its layers differ from this model's. "
            f"Recorded: {_describe_layers(stored)}. This run: {_describe_layers(wanted)}. "
            "Record into a new file, or pass mode='overwrite' to replace it.")
    px = run.probes_x()
    if px.shape != probes_x.shape or not np.array_equal(px, probes_x.astype(px.dtype)):
        raise AppendError(
            f"Cannot append to {run.path}: its probe images differ from this run's "
            f"(recorded shape {px.shape}, received {probes_x.shape}). Pass the same probes, "
            "or record into a new file.")
    py = run.probes_y()
    if probes_y is not None and py is not None and not np.array_equal(py, probes_y):
        raise AppendError(
            f"Cannot append to {run.path}: its probe labels differ from this run's "
            f"(recorded {py.tolist()}, received {np.asarray(probes_y).tolist()}).")
    if run.analysis_probe_count != analysis_probes:
        raise AppendError(
            f"Cannot append to {run.path}: it was recorded with {run.analysis_probe_count} "
            f"analysis probes, this run has {analysis_probes}. Pass the same analysis_probes, "
            "or record a new file.")
    if run.has_saliency != bool(saliency):
        raise AppendError(
            f"Cannot append to {run.path}: it was recorded "
            f"{'with' if run.has_saliency else 'without'} saliency maps, this run "
            f"{'records them' if saliency else 'does not'}. Pass the same saliency=, "
            "or record a new file.")
    reason = check_features_appendable(run, features)
    if reason is not None:
        raise AppendError(f"Cannot append to {run.path}: {reason}")


def prepare_append(path: str, *, layers: Sequence[LayerSpec], probes_x: np.ndarray,
                   probes_y: np.ndarray | None, analysis_probes: int, from_step: int,
                   saliency: bool = False, features: FeaturesSpec | None = None) -> Resumed:
    """Check, repair if needed, and cut ``path`` back to ``from_step``.

    Snapshots after ``from_step`` (left by a run that died after its last
    checkpoint) are dropped with a warning, so steps stay increasing.
    """
    with open_run(path) as run:
        check_appendable(run, layers, probes_x, probes_y, analysis_probes, saliency, features)
        needs_repair = not run.closed_cleanly
    if needs_repair:
        repair_run(path)
    f = open_for_writing(path)
    node = Handles(f)
    try:
        keep, last_step = steps_after(node, from_step)
        held = node(ANALYSIS_STEPS)[:] if ANALYSIS in f else np.zeros(0, dtype=np.int64)
        analysis_rows = int(np.searchsorted(held, from_step, side="right"))
        held_snapshots = node(STEPS).shape[0]
        if keep < held_snapshots:
            warnings.warn(
                f"The recording {path} holds {held_snapshots - keep} snapshot(s) after "
                f"step {from_step}, where training resumes; they are dropped so steps stay "
                "in order.", stacklevel=4)
            rows = {group: int(np.searchsorted(node(f"{METRICS}/{group}/{index[-1]}")[:],
                                               from_step, side="right"))
                    for group, index in METRIC_GROUPS.items()}
            truncate(node, keep, metric_rows=rows, analysis_rows=analysis_rows)
        feature_rows = rows_through(f, from_step)
        if features is not None:
            cut_features(node, feature_rows)
        last_features = int(node(FEATURES_STEPS)[feature_rows - 1]) if feature_rows else None
        node(STATUS)[0] = STATUS_RECORDING
        last_analysis = int(held[analysis_rows - 1]) if analysis_rows else None
    except BaseException:
        abandon(f)
        raise
    error = finish(f, node)
    if error is not None:
        raise RecordingError(f"Cannot write {path}: {h5_reason(error)}") from error
    return Resumed(last_step=last_step, last_analysis=last_analysis,
                   last_features=last_features)


def _describe_layers(layers: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {v}" for k, v in layers.items()) or "none"
