"""Step bookkeeping: which optimizer step a batch end belongs to, cheaply and exactly.

Reading ``optimizer.iterations`` costs most of a millisecond per step on a
small CPU model, so the count is read once per epoch and each batch's step is
derived from Keras' batch index (the last batch of an execution when
``steps_per_execution`` > 1). With gradient accumulation, with a last partial
execution of an epoch of unknown length, or once the derived count has
disagreed with the optimizer at an epoch end, the optimizer is read every step.
"""

from __future__ import annotations

import warnings
from typing import Callable


class StepCounter:
    """Optimizer steps for one fit. ``read`` returns ``optimizer.iterations`` as an int."""

    def __init__(self, read: Callable[[], int], *, steps_per_epoch: int | None,
                 read_every_step: bool):
        self.read = read
        self._steps_per_epoch = steps_per_epoch
        self._read_every_step = read_every_step
        self._epoch_start: int | None = None   # optimizer step when the epoch began
        self._derived_last: int | None = None  # last step derived from a batch index

    def epoch_begins(self) -> None:
        self._epoch_start = self.read()
        self._derived_last = None

    def at_batch_end(self, batch: int) -> int:
        """The optimizer's step count after ``batch`` of this epoch."""
        if self._read_every_step or self._epoch_start is None:
            return self.read()
        done = int(batch) + 1
        if self._steps_per_epoch:  # Keras reports a partial last execution as a full one
            done = min(done, int(self._steps_per_epoch))
        self._derived_last = self._epoch_start + done
        return self._derived_last

    def at_epoch_end(self, epoch: int) -> int:
        """The optimizer's step count now; checks the derived count against it."""
        step = self.read()
        if self._epoch_start is not None and self._derived_last is not None \
                and self._derived_last != step and not self._read_every_step:
            # The batch index did not add up to the optimizer's count (an
            # unusual trainer): from now on, read the count at every step.
            self._read_every_step = True
            warnings.warn(
                f"layerwatch: step numbers derived from batch indices ({self._derived_last}) "
                f"differ from optimizer.iterations ({step}) in epoch {epoch}; reading the "
                "optimizer at every step from now on.", RuntimeWarning, stacklevel=3)
        return step
