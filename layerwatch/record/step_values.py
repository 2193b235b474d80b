"""Each training step's own loss and metrics, from the running means Keras reports.

Keras hands callbacks the *epoch-so-far mean* of the loss and of every mean
metric (accuracy, …): ``m_k = (b_1 v_1 + … + b_k v_k) / (b_1 + … + b_k)``,
restarting each epoch. A step's own value is then exact from two running means
and the sample counts behind them::

    v_k = (c_k m_k - c_{k-1} m_{k-1}) / (c_k - c_{k-1})

With equal batches ``c_k = k b`` and this is ``k m_k - (k-1) m_{k-1}``. Only an
epoch's last batch may be smaller (arrays and batched ``tf.data`` split that
way): where the epoch's length is known, the metric's ``count`` is read at its
first and at its last batch — two variable reads an epoch — and the last step is
exact too. A step of several batches (``steps_per_execution``) gets the mean
over its batches. Metrics that are not means (AUC, precision, …) have no
per-step value and are kept as Keras reports them.
"""

from __future__ import annotations

from typing import Any, Callable

import keras

from layerwatch.store.schema import RUNNING, RUNNING_MEAN


def mean_metrics(model: keras.Model) -> dict[str, Any]:
    """The model's mean metrics (the loss tracker, accuracy, …) by logged name."""
    found: dict[str, Any] = {}

    def visit(metric: Any) -> None:
        if isinstance(metric, keras.metrics.Mean):
            found.setdefault(metric.name, metric)
        for inner in getattr(metric, "metrics", None) or []:
            if inner is not metric:
                visit(inner)

    for metric in getattr(model, "metrics", None) or []:
        visit(metric)
    return found


class StepValues:
    """Turns each batch end's logs into that step's own values (see the module).

    ``find`` returns the model's mean metrics by name (:func:`mean_metrics`),
    asked at the first batch end: Keras builds compiled metrics in the first
    train step. ``read`` returns a metric's ``count`` as a float (a variable read);
    without it (a distributed run, where reading a metric is a collective every
    worker would have to join) batches are taken as equal.
    """

    def __init__(self, find: Callable[[], dict[str, Any]], *, steps_per_epoch: int | None,
                 read: Callable[[Any], float] | None):
        self._find = find
        self._means: dict[str, Any] | None = None
        self._steps_per_epoch = steps_per_epoch
        self._read = read
        self._previous: dict[str, tuple[float, float]] = {}  # name -> (count, running mean)
        self._unit: dict[str, float] = {}  # name -> samples in one full batch

    def epoch_begins(self) -> None:
        self._previous, self._unit = {}, {}

    def convert(self, logs: dict[str, float], batch: int) -> dict[str, float]:
        """``logs`` of the batch with index ``batch`` (this epoch), as stored rows:
        ``name`` the step's own value and ``name_running_mean`` Keras' running
        mean for mean metrics; ``name_running`` for the others; anything not a
        metric (the learning rate) as it is."""
        if self._means is None:
            self._means = self._find()
        out: dict[str, float] = {}
        done = int(batch) + 1
        last = self._steps_per_epoch is not None and done >= int(self._steps_per_epoch)
        for name, value in logs.items():
            metric = self._means.get(name)
            if metric is None:
                known = name == "learning_rate" or name.startswith("val_")
                out[name if known else name + RUNNING] = value
                continue
            out[name + RUNNING_MEAN] = value
            # Counts in samples once the first batch's is known, else in batches.
            count = done * self._unit.get(name, 1.0)
            if self._read is None:
                pass
            elif self._steps_per_epoch is not None and done == 1:
                count = self._unit[name] = self._read(metric)
            elif last and name in self._unit:
                count = self._read(metric)  # the last batch may be smaller
            before, mean_before = self._previous.get(name, (0.0, 0.0))
            added = count - before
            out[name] = (count * value - before * mean_before) / added if added > 0 else value
            self._previous[name] = (count, value)
        return out
