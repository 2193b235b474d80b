"""The time budget: how much of a training step recording costs, and what would fit.

:class:`CostMeter` times the first batches of a fit; :func:`over_budget` turns
its figures into the one warning (or, with ``every="auto"``, the new
``every``) that :class:`~layerwatch.record.callback.LayerWatch` acts on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class CostMeter:
    """Times recording against training over the first batches of a fit.

    A snapshot taken by a separate probe pass costs the callback's own time;
    one fused into the train step (see :mod:`layerwatch.record.fused`) costs what
    that train call takes beyond a plain one, plus the callback's time to
    hand it over. With fused snapshots at every step, the meter asks for
    every other one to be taken separately, so fused and plain train calls
    alternate; a fused call's extra time is its difference from the plain
    calls on either side of it, and the median of those is the estimate
    (steps get faster over a fit's first batches, and a slow spell of the
    machine lasts several steps: both fall on the two alike). A step held for
    one replay of several (PyTorch, :mod:`~layerwatch.record.held`) costs
    little at its batch end and the replay's time at the one that releases it:
    its estimate is the mean over the measured steps, once one released.
    """

    warmup = 2     # batch ends skipped: tracing and compilation
    batches = 16   # batch ends measured after that

    def __init__(self) -> None:
        self._seen = 0
        self._last_end: float | None = None
        self._last_step: int | None = None
        self._calls: list[tuple[bool, float]] = []  # (fused?, seconds per step), in order
        self._handover: list[float] = []    # callback seconds after a fused step
        self._record: list[float] = []      # callback seconds per separate snapshot
        self._write: list[float] = []       # of which handing it to the writer
        self._held = False                  # snapshots held for one replay of several
        self._released = False              # a replay of held snapshots was measured
        self.first_step: int | None = None
        self.last_step: int | None = None

    def add(self, step: int, start: float, end: float, write: float | None, *,
            fused_call: bool = False, handover: float | None = None,
            held: bool = False, released: bool = False) -> None:
        """One batch end: its callback ran from ``start`` to ``end``; ``write``
        is the part after a separate snapshot was taken (None: none was);
        ``handover`` the part spent taking over a fused call's snapshot
        (default all of it); ``held``: the step's snapshot was held (``write``
        then 0), ``released``: held snapshots were replayed in it."""
        self._seen += 1
        if self._seen > self.warmup and self._last_end is not None and step > self._last_step:
            seconds = (start - self._last_end) / (step - self._last_step)
            if fused_call:
                self._handover.append(end - start if handover is None else handover)
            self._calls.append((fused_call, seconds))
            if write is not None:
                self._record.append(end - start)
                self._write.append(write)
            self._held |= held
            self._released |= released
            self.first_step = step if self.first_step is None else self.first_step
            self.last_step = step
        self._last_end, self._last_step = end, step

    def wants_plain_step(self, fused_call: bool) -> bool:
        """Whether the next snapshot should be taken separately, so that a plain
        train call follows: after each fused call (``fused_call``: the one this
        batch end follows) once the warm-up is over, so the two alternate."""
        return fused_call and self._seen >= self.warmup

    @property
    def done(self) -> bool:
        return len(self._calls) >= self.batches and (self._released or not self._held)

    def step_time(self) -> float | None:
        """Seconds a plain train call takes (median), None before one ran."""
        plain = [seconds for fused, seconds in self._calls if not fused]
        return float(np.median(plain)) if plain else None

    def record_cost(self) -> float | None:
        """Seconds one recorded step costs: a fused call's extra time (the median
        difference from its neighbouring plain calls) and its handover; without
        fused calls, a separate snapshot's time."""
        extra = self._extra()
        if extra:
            return max(0.0, float(np.median(extra))) + float(np.median(self._handover))
        if self._held:
            return float(np.mean(self._record)) if self._record else None
        return float(np.median(self._record)) if self._record else None

    def _extra(self) -> list[float]:
        """Per fused call beside a plain one: its seconds minus the mean of the
        plain calls just before and after it (those there are); empty unless
        both kinds ran."""
        calls = self._calls
        extra = []
        for i, (fused, seconds) in enumerate(calls):
            plain = [s for f, s in calls[max(i - 1, 0):i] + calls[i + 1:i + 2] if not f]
            if fused and plain:
                extra.append(seconds - sum(plain) / len(plain))
        return extra

    def write_cost(self) -> float:
        return float(np.median(self._write)) if self._write else 0.0


@dataclass(frozen=True)
class Verdict:
    """Recording costs more than the budget: what it costs and what would fit."""

    every: int      #: the smallest ``every`` that fits
    message: str    #: the warning, naming every= (and max_channels=) that fit


def over_budget(meter: CostMeter, *, every: int, budget: float,
                channels: Sequence[int]) -> Verdict | None:
    """A :class:`Verdict` when recording every ``every`` steps costs more than
    ``budget`` of training time; None when it fits or could not be measured.

    ``channels[i]`` is the number of channels recorded of layer ``i``.
    """
    step_time, cost, write = meter.step_time(), meter.record_cost(), meter.write_cost()
    if step_time is None or cost is None or step_time <= 0:
        return None
    share = cost / (every * step_time)
    if share <= budget:
        return None
    fitting = max(every + 1, math.ceil(cost / (budget * step_time)))
    fits = f"every={fitting}"
    widest = max(channels)
    for k in (64, 32, 16, 8):
        if k >= widest:
            continue
        kept = sum(min(c, k) / c for c in channels) / len(channels)
        # Forward pass stays; storing shrinks with the channels kept.
        cost_k = cost - write * (1 - kept)
        every_k = max(1, math.ceil(cost_k / (budget * step_time)))
        fits += f", or max_channels={k}" + (f" with every={every_k}" if every_k > 1 else "")
        break
    message = (
        f"layerwatch: recording costs {share:.0%} of training time ({cost * 1e3:.1f} ms per "
        f"recorded step, {step_time * 1e3:.1f} ms per training step, measured over steps "
        f"{meter.first_step}-{meter.last_step}), above budget={budget}. {fits} would "
        "bring it under budget (layers= narrows it further; every='auto' picks every; "
        "budget=None silences this).")
    return Verdict(every=fitting, message=message)


#: Default ``disk_budget``: bytes a recording may plan to write before LayerWatch warns.
DISK_BUDGET = 2_000_000_000


def snapshot_bytes(arrays: Sequence[np.ndarray], compression: str | None) -> list[int]:
    """Per layer, the bytes one snapshot takes on disk: deflated as the writer
    deflates it (byte shuffle + ISA-L) for ``"gzip"``, raw otherwise. One
    snapshot alone compresses less well than the writer's chunks of up to 32,
    so this errs high (by about a fifth on the seed recipe)."""
    from layerwatch.store import codec

    sizes = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        sizes.append(len(codec.deflate(codec.shuffle(a), 4)) if compression == "gzip"
                     else a.nbytes)
    return sizes


def over_disk(*, per_layer: Sequence[int], names: Sequence[str], channels: Sequence[int],
              snapshots: int, every: int, budget: float | None, free: int | None,
              extra: int = 0) -> Verdict | None:
    """A :class:`Verdict` when ``snapshots`` snapshots of ``per_layer`` bytes
    each would write more than ``budget`` bytes or more than ``free`` bytes
    (the space left on the file's disk), ``extra`` bytes (analysis Grams,
    saliency, Grad-CAM, occlusion and feature images) counted beside them;
    None when they fit.

    The advice keeps every ``every`` steps' worth of snapshots in view: the
    ``every`` that fits, ``max_channels`` that fits at the current ``every``,
    and the widest layers ``layers=`` could leave out.
    """
    from layerwatch.text import format_bytes

    per_snapshot = int(sum(per_layer))
    planned = per_snapshot * snapshots + int(extra)
    limits = [(budget, f"disk_budget={format_bytes(budget)}")] if budget else []
    if free is not None:
        limits.append((free, f"the {format_bytes(free)} free on its disk"))
    if not limits:
        return None
    limit, named = min(limits, key=lambda item: item[0])
    if planned <= limit:
        return None
    factor = planned / max(limit - int(extra), 1)
    fitting = max(every + 1, math.ceil(every * factor))
    advice = [f"every={fitting}"]
    widest = max(channels)
    for k in (64, 32, 16, 8, 4):
        if k >= widest:
            continue
        cut = sum(size * min(c, k) / c for size, c in zip(per_layer, channels))
        if cut * snapshots + extra <= limit:
            advice.append(f"max_channels={k}")
            break
    biggest = sorted(zip(per_layer, names), reverse=True)[:3]
    advice.append("layers= without " + ", ".join(name for _, name in biggest)
                  + f" ({format_bytes(sum(size for size, _ in biggest))} of the "
                  f"{format_bytes(per_snapshot)} per snapshot)")
    silence = "; disk_budget=None lifts the budget" if limit == budget else ""
    besides = (f", plus {format_bytes(extra)} of analysis Grams and explanation maps "
               "(uncompressed)") if extra else ""
    message = (f"layerwatch: this run would write about {format_bytes(planned)} "
               f"({snapshots} snapshots of {format_bytes(per_snapshot)}, measured on the first "
               f"one{besides}), more than {named}. {'; or '.join(advice)} would fit "
               f"(every='auto' picks every{silence}).")
    return Verdict(every=fitting, message=message)
