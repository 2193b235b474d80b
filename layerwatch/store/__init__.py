"""The recording file: its schema, writing it during training, reading it back.

This package is the only part of layerwatch that imports h5py. The layout is
the public contract of ``docs/FORMAT.md``; its names live in
:mod:`~layerwatch.store.schema`, the chunk codec in
:mod:`~layerwatch.store.codec`, the writer thread in
:mod:`~layerwatch.store.writer` (continuing a file: :mod:`~layerwatch.store.append`),
the validating reader in :mod:`~layerwatch.store.reader`, file opening in
:mod:`~layerwatch.store.files`, and repair in :mod:`~layerwatch.store.repair`.
"""

from .append import AppendError
from .reader import LayerInfo, Metrics, Run, open_run, read_run
from .repair import repair_run
from .schema import (
                     FORMAT_VERSION,
                     STATUS_COMPLETE,
                     STATUS_RECORDING,
                     STATUS_STOPPED,
                     LayerSpec,
                     RecordingError,
                     utc_now,
)
from .writer import RunWriter

__all__ = ["AppendError", "FORMAT_VERSION", "LayerInfo", "LayerSpec", "Metrics",
           "RecordingError", "Run", "RunWriter", "STATUS_COMPLETE", "STATUS_RECORDING",
           "STATUS_STOPPED", "open_run", "read_run", "repair_run", "utc_now"]
