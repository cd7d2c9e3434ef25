"""The local block store behind an export: a regular file or a block device.

A :class:`FileVolume` does positional I/O on one file descriptor, so any number
of connections (and threads) can use it at once; ``flush`` (fdatasync) makes
every write that returned before it durable, whichever connection made it. That
is what lets the NBD server advertise multi-conn.

Reads and writes are synchronous and short for data in the page cache; the
server decides which calls go to a worker thread.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat

from havend.errors import VolumeError
from havend.journal.record import Kind, Record

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_ZERO_CHUNK = bytes(1 << 20)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False when the file system cannot do ``mode``."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
        return False
    raise OSError(err, os.strerror(err))


class FileVolume:
    """A file-backed volume with positional, thread-safe I/O."""

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = False) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            raise VolumeError(f"cannot open volume {self.path}: {exc.strerror}") from exc
        mode = os.fstat(self.fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            os.close(self.fd)
            raise VolumeError(f"volume {self.path} is neither a regular file nor a block device")
        self.is_block_device = stat.S_ISBLK(mode)
        # Works for both: a block device reports its size at SEEK_END.
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._can_punch = not self.is_block_device
        self._dsync = hasattr(os, "RWF_DSYNC")

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]  # short read: only at a file's end or on a signal
        done = len(data)
        while done < length:
            chunk = os.pread(self.fd, length - done, offset + done)
            if not chunk:  # past EOF of a file shorter than its advertised size
                parts.append(bytes(length - done))
                break
            parts.append(chunk)
            done += len(chunk)
        return b"".join(parts)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        done = os.pwrite(self.fd, data, offset)
        if done < len(data):
            view = memoryview(data)
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write and return only once the data is on stable storage."""
        if self._dsync:
            try:
                done = os.pwritev(self.fd, [data], offset, os.RWF_DSYNC)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._dsync = False
            else:
                if done == len(data):
                    return
                self.write(offset + done, memoryview(data)[done:])
                self.flush()
                return
        self.write(offset, data)
        self.flush()

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def trim(self, offset: int, length: int) -> None:
        """Give the range back to the file system; it then reads as zeroes."""
        if self._can_punch and not _fallocate(
            self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length
        ):
            self._can_punch = False  # trim is advisory: a no-op where unsupported

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool) -> None:
        if may_trim and self._can_punch:
            if _fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
                return
            self._can_punch = False
        if not self.is_block_device and _fallocate(
            self.fd, _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE, offset, length
        ):
            return
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_CHUNK), end - offset)
            self.write(offset, memoryview(_ZERO_CHUNK)[:n])
            offset += n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DiscardVolume(FileVolume):
    """A volume whose file is gone (a removed volume's local copy, a purged
    replica): it reads zeroes and forgets what is written to it, so that
    records and undo entries of its past have somewhere to go."""

    def __init__(self, path: str, size: int) -> None:  # no file to open
        self.path = path
        self.size = size
        self.fd = -1
        self.read_only = False
        self.is_block_device = False
        self._dsync = False
        self._can_punch = False

    def read(self, offset: int, length: int) -> bytes:
        return bytes(max(0, min(length, self.size - offset)))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        pass

    def write_fua(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        pass

    def trim(self, offset: int, length: int) -> None:
        pass

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def apply_record(volume: FileVolume, record: Record) -> None:
    """Carry out one journal record on a volume (source replay, target apply)."""
    if record.kind == Kind.WRITE:
        volume.write(record.offset, record.data)
    elif not record.kind.is_marker:  # ZERO and TRIM leave zeroes (a hole if possible)
        volume.write_zeroes(record.offset, record.length, may_trim=True)
