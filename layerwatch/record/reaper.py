"""Spent ``tf.data`` iterators, destroyed off the training thread.

Keras' TensorFlow fit loop (3.15) holds each epoch's iterator in a local of
``fit`` until the next epoch's first batch rebinds it (and the last one until
``fit`` returns). Destroying a ``tf.data`` iterator waits for its threads; with
the CPU idle the wait has been measured at 540–680 ms at an epoch's start
(2-core CPU, 0.6 s epochs; seconds on slower machines) — in plain Keras fits
too (up to 150 ms here), and more often with LayerWatch's callback in the
loop. TensorFlow releases the GIL during that wait, so it costs training
nothing if another thread does it.

The fused train function (:mod:`~layerwatch.record.fused`) sees every
iterator it is called with: it hands the previous one here when a new one
arrives, and the last one when ``fit`` ends, after a grace period for ``fit``
to drop its own reference. This thread then holds the last reference and the
destructor waits here instead of in the training loop.
"""

from __future__ import annotations

import threading
import time
from typing import Any

#: Seconds the last iterator of a fit is held before it is let go: ``fit``
#: returns (dropping its own reference) well within it.
AFTER_FIT = 1.0


class Reaper:
    """A daemon thread that lets go of objects at a given time."""

    def __init__(self) -> None:
        self._held: list[tuple[float, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def release(self, obj: Any, *, after: float = 0.0) -> None:
        """Let go of ``obj`` (the caller drops its references) on this thread,
        ``after`` seconds from now."""
        with self._lock:
            self._held.append((time.monotonic() + after, obj))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="layerwatch-reaper",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    @property
    def holding(self) -> int:
        """How many objects wait to be let go."""
        with self._lock:
            return len(self._held)

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    if any(at <= now for at, _ in self._held):
                        break
                    soonest = min((at for at, _ in self._held), default=None)
                    self._wake.wait(None if soonest is None else soonest - now)
                due = [obj for at, obj in self._held if at <= now]
                self._held = [(at, obj) for at, obj in self._held if at > now]
            del due  # the destructors run here, outside the lock


_REAPER = Reaper()


def release(obj: Any, *, after: float = 0.0) -> None:
    """Destroy ``obj`` on the reaper's thread ``after`` seconds from now (see the module)."""
    _REAPER.release(obj, after=after)


def holding() -> int:
    """Objects the reaper holds still."""
    return _REAPER.holding
