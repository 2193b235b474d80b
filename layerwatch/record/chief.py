"""Which process writes the recording when several train one model.

Multi-worker training runs the callback in every worker; exactly one writes,
by the same rule checkpoints follow. The others record nothing, create no
file and never wait on a writer.
"""

from __future__ import annotations

import json
import os

import keras


def is_chief(model: keras.Model) -> bool:
    """Whether this process writes the recording of ``model``'s fit (backend-specific).

    TensorFlow: the strategy's chief (``should_checkpoint``, as checkpoints
    do). JAX: process 0. PyTorch: rank 0 of an initialized process group.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        strategy = getattr(model, "distribute_strategy", None)
        return bool(getattr(getattr(strategy, "extended", None), "should_checkpoint", True))
    if backend == "jax":
        import jax

        return jax.process_index() == 0
    if backend == "torch":
        import torch.distributed as dist

        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    return True


def env_is_chief() -> bool:
    """Before fit: whether TF_CONFIG (TensorFlow's multi-worker setup) names this the chief."""
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        task = config.get("task") or {}
        kind, index = task.get("type"), int(task.get("index", 0))
        has_chief = bool((config.get("cluster") or {}).get("chief"))
    except (ValueError, TypeError, AttributeError):
        return True
    if kind in (None, "chief"):
        return True
    return kind == "worker" and index == 0 and not has_chief
