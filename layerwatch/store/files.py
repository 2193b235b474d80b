"""Opening recording files: for writing, for reading (plain or SWMR), and temporary siblings.

Every ``h5py.File`` layerwatch opens is opened here, so the rules for a live,
killed or damaged file are in one place.
"""

from __future__ import annotations

import os
import secrets
import stat
from typing import Any

import h5py

from layerwatch.text import printable

from .closing import abandoned_here
from .schema import STATUS, STATUS_RECORDING, RecordingError


def open_for_writing(path: str) -> h5py.File:
    """Open an existing recording read-write (HDF5's latest format)."""
    try:
        return h5py.File(path, "r+", libver="latest")
    except OSError as exc:
        raise RecordingError(f"Cannot open {path} for writing: {h5_reason(exc)}") from exc


def open_for_reading(path: str) -> h5py.File:
    if not os.path.exists(path):
        raise RecordingError(f"{path} does not exist.")
    if os.path.isdir(path):
        raise RecordingError(f"{path} is a directory, not a recording.")
    if not os.path.isfile(path):
        raise RecordingError(f"{path} is not a regular file (not a layerwatch recording).")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except Exception as exc:
        raise RecordingError(f"Cannot read {path}: {h5_reason(exc)}") from exc
    if not is_hdf5:
        raise RecordingError(f"{path} is not an HDF5 file (not a layerwatch recording).")
    if abandoned_here(path):
        # This process could not finish writing it: read what is on disk.
        try:
            return _open_swmr(path, apart=True)
        except Exception as exc:
            raise RecordingError(f"{path} is damaged or unreadable: {h5_reason(exc)}") from exc
    # A closed file opens plainly. A file a writer holds (live) or held when it
    # was killed is flagged open-for-write and needs SWMR reading.
    try:
        return h5py.File(path, "r", locking=False)
    except Exception as exc:
        first = exc
    if "truncated file" in str(first):
        # Shorter than its own superblock says. A writer that could not extend
        # the file (a full disk, a file-size limit) leaves it so: HDF5 counted
        # the space of a write that failed. Its status still says recording,
        # and SWMR reading (which allows a live file to be shorter) reads what
        # it committed. A closed recording cut short is damaged: SWMR reading
        # would show whatever the cut left.
        try:
            f = _open_swmr(path)
        except Exception:
            f = None
        if f is not None and _says_recording(f):
            return f
        if f is not None:
            f.close()
        raise RecordingError(f"{path} is damaged or unreadable: {h5_reason(first)}") from first
    try:
        return _open_swmr(path)
    except Exception:
        pass
    try:
        # This process itself is writing the file (a notebook reading a run
        # its own fit() is recording): HDF5 shares the open file, and the
        # open only succeeds with the writer's (default) locking settings.
        return _open_swmr(path, disable_locking=False)
    except Exception:
        pass
    raise RecordingError(f"{path} is damaged or unreadable: {h5_reason(first)}")


def _says_recording(f: h5py.File) -> bool:
    """Whether ``f`` holds a well-formed ``status`` of STATUS_RECORDING."""
    try:
        ds = f.get(STATUS)
        return isinstance(ds, h5py.Dataset) and ds.shape == (1,) and ds.dtype.kind in "iu" \
            and ds.dtype.itemsize <= 8 and int(ds[0]) == STATUS_RECORDING
    except Exception:
        return False


def _open_swmr(path: str, *, disable_locking: bool = True, apart: bool = False) -> h5py.File:
    """Open for SWMR reading with bounded retries; ``disable_locking=False``
    keeps HDF5's default file locking (what h5py and the writer use).

    ``apart``: through HDF5's "log" driver (the default sec2 driver, logging
    nothing), which HDF5 does not match with the same file opened through
    sec2 in this process: a separate open of what is on disk."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    if apart:
        fapl.set_fapl_log(os.fsencode(os.devnull), 0, 0)
    if disable_locking:
        fapl.set_file_locking(False, True)
    _limit_read_attempts(fapl)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ,
                        fapl=fapl)
    return h5py.File(fid)


_SET_READ_ATTEMPTS: Any = None


def _limit_read_attempts(fapl: h5py.h5p.PropFAID) -> None:
    """Bound HDF5's retries of metadata that fails its checksum.

    A SWMR reader retries such reads (a live writer may be mid-write) 100
    times, doubling a sleep from 1 ns each time: on a damaged file that is a
    hang of centuries. 16 tries sleep about a millisecond in all. h5py does
    not expose H5Pset_metadata_read_attempts, so it is called through ctypes
    in the HDF5 library h5py itself loaded; where that fails, HDF5's default
    stays.
    """
    global _SET_READ_ATTEMPTS
    if _SET_READ_ATTEMPTS is None:
        _SET_READ_ATTEMPTS = False
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                libs = {line.split()[-1] for line in maps
                        if "libhdf5" in line and "_hl" not in line and "/" in line}
            for lib in sorted(libs):
                fn = getattr(ctypes.CDLL(lib), "H5Pset_metadata_read_attempts", None)
                if fn is not None:
                    fn.argtypes, fn.restype = [ctypes.c_int64, ctypes.c_uint], ctypes.c_int
                    _SET_READ_ATTEMPTS = fn
                    break
        except Exception:
            pass
    if _SET_READ_ATTEMPTS:
        _SET_READ_ATTEMPTS(fapl.id, 16)


def h5_reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return printable(text.splitlines()[0])[:300]


def temporary_beside(path: str, *, like: str | None = None) -> str:
    """A new empty file in ``path``'s directory, named to be moved onto ``path``.

    It has the permissions of ``like`` (the file it will replace) or else a new
    file's usual ones, 0666 less the umask, as ``open()`` would give: not
    ``mkstemp``'s 0600, which would keep a recording from the rest of its group.
    """
    directory = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        if like is not None:
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(like).st_mode))
            except OSError:
                os.unlink(tmp)
                raise
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")
