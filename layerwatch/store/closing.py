"""Ending a write: closing a file in order, or abandoning one HDF5 could not write.

When HDF5 closes a dataset or a file it first writes what it still holds for
it (chunk cache, sieve buffer, metadata). If that write fails (a full disk, a
file-size limit, EIO), HDF5 1.14 frees the object anyway but keeps its id
registered, pointing at the freed memory, and h5py keeps its handle. Any later
use of that id reads freed memory: h5py releasing the handle when it is
garbage-collected (a SIGSEGV at interpreter exit), ``File.close()`` releasing
the file's objects, HDF5 counting open objects for another file, or HDF5
shutting down. So a file being written is closed only after a flush
succeeded, when closing has nothing left to write (:func:`finish`), and one
whose write failed is never closed (:func:`abandon`).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import h5py
from h5py._objects import phil as _HDF5_LOCK  # h5py's lock around the HDF5 library

#: (st_dev, st_ino) of the files this process abandoned.
_ABANDONED: set[tuple[int, int]] = set()
#: Descriptors that keep abandoned files open (see _freeze).
_KEPT_OPEN: list[int] = []


class Handles:
    """Datasets of a file being written, each opened once (opening costs
    milliseconds) and kept open until :func:`finish` closes them.

    A dataset handle dropped while HDF5 holds unwritten data for it writes
    that data as it closes, where a failure leaves a dangling id behind; kept
    open, the data is written by the file's flush, and a failure there is an
    ordinary exception.
    """

    def __init__(self, f: h5py.File):
        self.file = f
        self._open: dict[str, Any] = {}

    def __call__(self, path: str) -> h5py.Dataset:
        ds = self._open.get(path)
        if ds is None:
            ds = self._open[path] = self.file[path]
        return ds

    def hold(self, obj: Any) -> Any:
        """Keep an object just made (a group or dataset) open until :func:`finish`."""
        self._open[f"#{len(self._open)}"] = obj
        return obj

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._open.values()))


def finish(f: h5py.File, handles: Any = ()) -> BaseException | None:
    """Flush ``f``, then close ``handles`` (its open objects) and the file,
    each once. Returns None, or the error that kept HDF5 from writing the
    file, which is then abandoned instead of closed (:func:`abandon`)."""
    with _HDF5_LOCK:
        try:
            f.flush()
        except Exception as exc:
            abandon(f)
            return exc
        # Nothing is left to write: the closes below do not fail on I/O.
        try:
            for obj in reversed(list(handles)):
                obj.id.close()
        except Exception as exc:  # not expected: keep the rest of the file open
            abandon(f)
            return exc
        try:
            f.close()
        except Exception as exc:  # not expected; the file's id may dangle already
            f.id.locked = True
            return exc
    return None


def abandoned_here(path: str) -> bool:
    """Whether ``path`` is a file this process abandoned (:func:`abandon`).

    HDF5 shares an open file with every later open of the same file in the
    process, and an abandoned file's shared state is broken (unwritable data,
    a half-flushed cache): layerwatch reads such a file through a file driver
    of its own, which HDF5 does not share (see ``files.open_swmr``).
    """
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) in _ABANDONED


def abandon(f: h5py.File) -> None:
    """Leave ``f``, which HDF5 could not write, open for good: never flush or
    close it again.

    Each of its open objects (the file itself included) gets one more
    reference that h5py never releases (a locked ObjectID), so no h5py handle
    being released, garbage-collected at exit included, can close anything
    of it. HDF5 closes what is left when the library shuts down at exit; that
    close fails quietly, once per object. Before that, its descriptor is made
    a read-only one of the same file (:func:`_freeze`), so nothing HDF5 still
    holds can reach the file: it keeps what was written before the failure,
    as a killed writer leaves it (``layerwatch repair`` makes it a plain HDF5
    file again). The cost is the file's descriptor and HDF5's caches for it,
    kept until the process exits.
    """
    with _HDF5_LOCK:
        try:
            if not f.id.valid:
                return
            identity = _freeze(f)
            if identity is not None:
                _ABANDONED.add(identity)
            pins = h5py.h5f.get_obj_ids(f.id, h5py.h5f.OBJ_ALL | h5py.h5f.OBJ_LOCAL)
        except Exception:
            pins = [f.id]
        for obj in pins:
            obj.locked = True


def _freeze(f: h5py.File) -> tuple[int, int] | None:
    """Swap HDF5's descriptor of ``f`` for a read-only one of the same file
    (or of /dev/null where it cannot be reopened, e.g. after EIO): writes
    HDF5 still attempts fail with EBADF, reads still see the file. Returns
    the file's (st_dev, st_ino), or None if the swap could not be made.

    The file stays open, so its inode is never reused while HDF5 remembers
    it (HDF5 would take a new file with that inode for this one).
    """
    try:
        if f.driver != "sec2":
            return None
        fd = int(f.id.get_vfd_handle())
        st = os.fstat(fd)
        try:
            # The open file itself, even if it was removed or renamed (Linux).
            ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            if os.fstat(ro)[1:3] != st[1:3]:  # (st_ino, st_dev)
                os.close(ro)
                raise OSError("not the same file")
        except OSError:
            _KEPT_OPEN.append(os.dup(fd))  # holds the inode; never read or written
            ro = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.dup2(ro, fd, inheritable=False)
        finally:
            os.close(ro)
        return st.st_dev, st.st_ino
    except Exception:  # the file stays as it is: still never closed
        return None
