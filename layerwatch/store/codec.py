"""The chunk codec: how activation chunks are sized, encoded and given room on disk.

Activations are chunked along time (several snapshots of a layer per chunk),
byte-shuffled and deflated here rather than by HDF5, then written as raw
chunks (:meth:`layerwatch.store.writer.RunWriter`): the stream is HDF5's own
shuffle + deflate format, so any HDF5 reader inflates it.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import h5py
import numpy as np

#: Activations are chunked along time: one chunk holds up to this many
#: snapshots of a layer (a power of two), and at most ``CHUNK_BYTES``
#: uncompressed, HDF5's default per-dataset chunk cache, so a plain h5py
#: reader going snapshot by snapshot decompresses each chunk once.
MAX_CHUNK_SNAPSHOTS = 32
CHUNK_BYTES = 1 << 20

def reserved_room(length: int, full: int | None, raw: int) -> int:
    """Bytes to reserve for a partly filled chunk now ``length`` bytes long, so
    it can fill: 10 % over ``full``, the largest full chunk of its layer so
    far, or before there is one, twice its size now (``raw``, the chunk's
    uncompressed size, bounds deflate's output).

    In SWMR mode HDF5 never frees a rewritten chunk's old space (a reader may
    still point at it): a chunk rewritten at another size leaves a hole in the
    file for good, one rewritten at the same size stays in place. So a partly
    filled chunk is written with room to grow, and its later writes are padded
    to the same size (:meth:`layerwatch.store.writer.RunWriter._write_rows`). A layer's first chunk
    doubles its room when it outgrows it, so the holes it leaves add up to
    less than its own size. The padding follows the end of the zlib stream,
    where inflating stops: HDF5's deflate filter ignores it.
    """
    return min(int(full * 1.1) if full else 2 * length, raw + raw // 1000 + 64)


def time_chunk(shape: Sequence[int], dtype: Any) -> int:
    """Snapshots per chunk for a layer: a power of two, at most 32 and 1 MiB."""
    per_snapshot = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    fits = max(1, min(MAX_CHUNK_SNAPSHOTS, CHUNK_BYTES // max(per_snapshot, 1)))
    return 1 << (fits.bit_length() - 1)


def chunk_encoder(ds: h5py.Dataset):
    """A function from a full chunk's rows to its bytes on disk, or None.

    For the default filters (byte shuffle, then deflate) the chunk is encoded
    here with ISA-L's deflate (the ``isal`` package; several times faster than
    zlib on this kind of data, same stream format) and written directly, so any
    HDF5 reader inflates it as usual. Without ``isal`` the standard library's
    zlib does the same, more slowly. Other filter choices return None: HDF5
    applies them itself.
    """
    plist = ds.id.get_create_plist()
    filters = {plist.get_filter(i)[0] for i in range(plist.get_nfilters())}
    deflate_id, shuffle_id = h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE
    if deflate_id not in filters or not filters <= {deflate_id, shuffle_id}:
        return None
    shuffled = shuffle_id in filters
    level = 4 if ds.compression_opts is None else int(ds.compression_opts)

    def encode(rows: np.ndarray) -> bytes:
        rows = np.ascontiguousarray(rows)
        return deflate(shuffle(rows) if shuffled else rows, level)

    return encode


def shuffle(rows: np.ndarray) -> np.ndarray:
    """HDF5's shuffle filter: all elements' first bytes (in memory order), then all
    second bytes, and so on, as one contiguous uint8 array.

    For 2- and 4-byte elements on a little-endian machine, memory byte k of
    every element is taken as ``(word >> 8k)`` truncated to uint8, the words
    read in the machine's order whatever the array's dtype says: contiguous
    vector operations, about five times faster than a strided byte transpose.
    """
    size = rows.itemsize
    if size not in (2, 4) or sys.byteorder != "little":
        return np.ascontiguousarray(rows.view(np.uint8).reshape(-1, size).T).reshape(-1)
    words = rows.reshape(-1).view(np.uint16 if size == 2 else np.uint32)
    n = words.size
    out = np.empty(size * n, dtype=np.uint8)
    np.copyto(out[:n], words, casting="unsafe")  # byte 0: the low byte
    for k in range(1, size):
        np.copyto(out[k * n:(k + 1) * n], words >> (8 * k), casting="unsafe")
    return out


try:
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal has wheels for the usual platforms
    _isal = None


def deflate(data: Any, level: int) -> bytes:
    """A zlib-format deflate stream of ``data``, any contiguous buffer (what HDF5's
    deflate filter reads).

    Both libraries release the GIL while compressing, so the training loop's
    Python keeps running beside the writer thread.
    """
    if _isal is not None:
        return _isal.compress(data, _isal_level(level))
    import zlib

    return zlib.compress(data, level)


def _isal_level(level: int) -> int:
    """ISA-L's level (0–3) for a zlib level (0–9): 1–3 → 1, 4–6 → 2, 7–9 → 3.

    Measured on the seed recording (``bench/storage.py``), ISA-L's level 2
    compresses nearly as well as its level 3 in under half the time.
    """
    return 0 if level <= 0 else min(3, (level + 2) // 3)
