"""Recorded steps whose snapshots wait for one probe pass over several of them.

Where the probe pass can replay several steps at once (PyTorch, small models:
:mod:`~layerwatch.record.torch_batch`), a recorded step's batch end only has
the pass keep a copy of the weights; :class:`HeldSteps` notes the step and
has them all replayed and recorded when the pass's slots are full, or half of
``flush_seconds`` after the first was held: at a batch end, or from a timer
thread when training stalls (a long callback, a pause), so that held steps
reach the writer as promptly as the writer's own timer flushes them.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

#: ``record(step, arrays, grams, epoch=, wall_time=)``: hand one snapshot to the writer.
Record = Callable[..., None]


class HeldSteps:
    """The held steps of one recording, in order, and their timer.

    Parameters
    ----------
    probes : ProbePass
        Holds the weights (:meth:`ProbePass.hold`) and replays them (:meth:`ProbePass.release`).
    record : callable
        Hands each replayed snapshot to the writer (see :data:`Record`).
    wait : float
        Seconds a held step may wait for later ones.
    """

    def __init__(self, probes: Any, record: Record, *, wait: float):
        self._probes = probes
        self._record = record
        self._wait = float(wait)
        self._steps: list[tuple[int, int, Any, float]] = []
        self._lock = threading.RLock()
        self._timer = _Timer(self._wait, self._release_late)
        self._error: Exception | None = None
        #: How many times held steps were replayed.
        self.releases = 0

    def __len__(self) -> int:
        return len(self._steps)

    def hold(self, step: int, epoch: int, grams: Callable[[], Any]) -> bool:
        """Hold ``step`` (its weights kept by the probe pass, ``grams()`` taken now)
        and replay the held steps if they are due; False where the pass does not hold.

        Raises what went wrong when the timer last replayed held steps."""
        self._raise_late()
        with self._lock:
            if not self._probes.hold():
                return False
            now = time.time()
            self._steps.append((step, epoch, grams(), now))
            if len(self._steps) >= self._probes.slots or now - self._steps[0][3] >= self._wait:
                self.release()
            elif len(self._steps) == 1:
                self._timer.arm()
        return True

    def release(self) -> None:
        """Replay the held steps and record them, in order."""
        with self._lock:
            self._timer.disarm()
            held, self._steps = self._steps, []
            if not held:
                return
            self.releases += 1
            for (step, epoch, grams, when), arrays in zip(held, self._probes.release()):
                self._record(step, arrays, grams, epoch=epoch, wall_time=when)

    def close(self) -> None:
        """Release what is held, then stop the timer (raises what a release raised)."""
        try:
            self._raise_late()
            self.release()
        finally:
            self._timer.stop()

    def _release_late(self) -> None:
        try:
            self.release()
        except Exception as exc:  # raised in training's thread: see _raise_late
            self._error = exc

    def _raise_late(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class _Timer:
    """Calls ``action`` ``seconds`` after :meth:`arm`, unless :meth:`disarm`
    comes first; one thread for the recording's life, started at the first
    :meth:`arm` (arming wakes it: no thread is started per held batch, which
    can wait a whole scheduler slice on a busy machine)."""

    def __init__(self, seconds: float, action: Callable[[], None]):
        self._seconds = seconds
        self._action = action
        self._due: float | None = None
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._condition = threading.Condition()

    def arm(self) -> None:
        with self._condition:
            self._due = time.monotonic() + self._seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="layerwatch-held",
                                                daemon=True)
                self._thread.start()
            self._condition.notify()

    def disarm(self) -> None:
        with self._condition:
            self._due = None

    def stop(self) -> None:
        with self._condition:
            self._stopped, self._due = True, None
            self._condition.notify()

    def _run(self) -> None:
        with self._condition:
            while not self._stopped:
                if self._due is None:
                    self._condition.wait()
                    continue
                left = self._due - time.monotonic()
                if left > 0:
                    self._condition.wait(left)
                    continue
                self._due = None
                self._condition.release()
                try:
                    self._action()
                finally:
                    self._condition.acquire()

