"""A short human-readable summary of a recording (what ``layerwatch info`` prints)."""

from __future__ import annotations

import os
import time


from .store import STATUS_COMPLETE, STATUS_RECORDING, STATUS_STOPPED, Run, open_run


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
        f"  model {attrs.get('model_name', '?')}, keras {attrs.get('keras_version', '?')} "
        f"({attrs.get('backend', '?')}), created {attrs.get('created', '?')}")
    lines.append(f"  status: {_status(run)}")
    if len(steps):
        lines.append(f"  snapshots: {len(steps)}, steps {steps[0]}..{steps[-1]}, "
                     f"epochs {epochs[0] + 1}..{epochs[-1] + 1}")
    else:
        lines.append("  snapshots: 0")
    probes_y = run.probes_y()
    lines.append(f"  probes: {run.probes_x().shape[0]} of shape {run.probes_x().shape[1:]}"
                 + (f", labels {probes_y.tolist()}" if probes_y is not None else ""))
    lines.append("  layers:")
    width = max(len(layer.key) for layer in run.layers)
    for layer in run.layers:
        lines.append(
            f"    {layer.key:<{width}}  {layer.layer_class:<16} {str(layer.shape):<16} "
            f"{layer.activation:<10} recorded: {layer.tensor}")
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
    lines.append(f"  size on disk: {_bytes(size)} (activations {_bytes(stored)}{ratio}, "
                 f"stored as {run.storage_dtype})")
    return lines


def _status(run: Run) -> str:
    status = run.status
    if status == STATUS_COMPLETE:
        return "complete (closed normally)"
    if status == STATUS_STOPPED:
        return "incomplete: recording stopped early (training raised, or a write failed)"
    beat = run.heartbeat
    ago = f"; last write {time.time() - beat:.0f} s ago" if beat else ""
    if status == STATUS_RECORDING:
        return ("not closed: still recording, or the run ended without closing "
                f"(killed){ago}")
    return f"unknown status {status}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


