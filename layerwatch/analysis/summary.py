"""A short human-readable summary of a recording (what ``layerwatch info`` prints)."""

from __future__ import annotations

import os
import time

from layerwatch.store import STATUS_COMPLETE, STATUS_STOPPED, Run, open_run
from layerwatch.text import format_bytes, printable, shorten

from .health import health_lines


def describe_run(path: str | os.PathLike) -> str:
    """Summarize a recording: layers, snapshots, metrics, size and state.

    Raises
    ------
    RecordingError
        The file is missing, foreign or damaged.
    """
    with open_run(path) as run:
        return "\n".join(_lines(run))


def _lines(run: Run) -> list[str]:
    attrs = run.attrs
    steps, epochs = run.steps, run.epochs
    lines = [f"{run.path}: layerwatch recording (format {attrs.get('format_version')})"]
    lines.append(
        f"  model {shorten(attrs.get('model_name', '?'))}, "
        f"keras {shorten(attrs.get('keras_version', '?'))} ({shorten(attrs.get('backend', '?'))}),"
        f" created {shorten(attrs.get('created', '?'))}")
    lines.append(f"  status: {_status(run)}")
    if len(steps):
        lines.append(f"  snapshots: {len(steps)}, steps {steps[0]}..{steps[-1]}, "
                     f"epochs {epochs[0] + 1}..{epochs[-1] + 1}")
    else:
        lines.append("  snapshots: 0")
    probes_y = run.probes_y()
    probes_shape = run.probes_x().shape
    labels = probes_y.tolist() if probes_y is not None else None
    if labels is not None and len(labels) > 20:
        labels = labels[:20] + ["..."]
    inputs = run.probe_inputs()
    shapes = ", ".join(f"{printable(name)} {a.shape[1:]}" for name, a in inputs.items())
    lines.append(f"  probes: {probes_shape[0]} of shape "
                 + (f"{probes_shape[1:]}" if not inputs else f"({shapes})")
                 + (f", labels {labels}" if labels is not None else ""))
    lines.append("  layers:")
    width = min(40, max(len(layer.key) for layer in run.layers))
    for layer in run.layers:
        lines.append(
            f"    {printable(layer.key):<{width}}  {layer.layer_class:<16} "
            f"{str(layer.shape):<16} {layer.activation:<10} {layer.dtype:<8} "
            f"recorded: {layer.tensor}")
    lines.extend(_explanation_lines(run))
    lines.extend(_nonfinite_lines(run, steps))
    lines.extend(health_lines(run))
    for group in ("batch", "epoch"):
        metrics = run.metrics(group)
        if metrics.names:
            last = []
            for name in metrics.names:
                _, values = metrics.get(name)
                last.append(f"{name}={values[-1]:.4g}" if len(values) else f"{name}=n/a")
            label = "metrics (last step)" if group == "batch" else "epoch metrics (last epoch)"
            lines.append(f"  {label}: " + ", ".join(last))
    stored, raw = run.storage_bytes()
    size = os.path.getsize(run.path)
    ratio = f", {stored / raw:.3f} of raw float32" if raw else ""
    dtypes = sorted({layer.dtype for layer in run.layers})
    stored_as = dtypes[0] if len(dtypes) == 1 else " and ".join(dtypes) + " by layer"
    lines.append(f"  size on disk: {format_bytes(size)} (activations {format_bytes(stored)}"
                 f"{ratio}, stored as {stored_as})")
    return lines


def _explanation_lines(run: Run) -> list[str]:
    """What the run holds beside the activations: saliency, Grad-CAM, occlusion,
    feature images (one line each, only those recorded)."""
    lines = []
    if run.has_saliency:
        lines.append(f"  saliency: a map per probe at each of the {run.num_snapshots} "
                     "snapshots (d output at the label / d input)")
    if run.has_gradcam:
        keys = ", ".join(printable(k) for k in run.gradcam_layers)
        lines.append(f"  grad-cam: at each snapshot, layers {keys}")
    if run.has_occlusion:
        steps, settings = run.occlusion_steps, run.occlusion_settings or {}
        at = f"steps {steps[0]}..{steps[-1]}" if len(steps) else "none committed"
        lines.append(f"  occlusion: {len(steps)} map set(s), {at}; patch "
                     f"{settings.get('patch', '?')}, stride {settings.get('stride', '?')}, "
                     f"every {settings.get('every', '?')} steps")
    if run.has_features:
        steps, keys = run.feature_steps, run.feature_layers
        at = f"steps {steps[0]}..{steps[-1]}" if len(steps) else "none committed"
        counts = ", ".join(f"{printable(k)} ({len(run.feature_channels(k))})" for k in keys)
        lines.append(f"  features: {len(steps)} set(s), {at}; images per layer: {counts}")
    return lines


def _nonfinite_lines(run: Run, steps) -> list[str]:
    """Where training diverged: the first snapshot with NaN/inf, per layer."""
    found = []
    for layer in run.layers:
        index = run.first_nonfinite(layer.key)
        if index is not None:
            found.append(f"{printable(layer.key)} from step {steps[index]}")
    if not found:
        return []
    return ["  non-finite values (NaN/inf; training diverged?): " + ", ".join(found)]


def _status(run: Run) -> str:
    status = run.status
    if status == STATUS_COMPLETE:
        return "complete (closed normally)"
    if status == STATUS_STOPPED:
        return "incomplete: recording stopped early (training raised, or a write failed)"
    beat = run.heartbeat
    ago = f"last write {max(0.0, time.time() - beat):.0f} s ago" if beat else "no write seen"
    pid = run.attrs.get("writer_pid", "?")
    state = run.writer_state
    if state == "live":
        return f"recording (the writing process {pid} is running; {ago})"
    if state == "gone":
        return (f"incomplete: the run ended without closing (the writing process {pid} is "
                f"gone: killed or crashed; {ago}). Every snapshot flushed before that is "
                "readable; `layerwatch repair` lets tools without SWMR open the file.")
    if state == "stalled":
        return (f"incomplete: not closed, and the writing process {pid} has stopped writing "
                f"({ago}): recording failed, or the process hangs.")
    if status == 0:
        return ("not closed: still recording on another host, or the run ended without "
                f"closing ({ago})")
    return f"unknown status {status}"
