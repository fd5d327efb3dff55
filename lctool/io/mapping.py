"""Copy-on-write memory maps of byte ranges that hold no file descriptor.

Python's mmap (before 3.13) keeps a duplicate descriptor per mapping, so thousands of live mapped
tensors would exhaust the open-files limit. Here the range is mapped with libc directly, the file
is closed at once, and the mapping is released when the last object using the buffer goes away.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
# Map the whole range's page-cache pages in one call (read-only, so no copy-on-write is triggered):
# callers read whole tensors, and one kernel pass is much faster than a page fault per 4 KiB.
# Linux >= 5.14; elsewhere the call fails harmlessly and pages fault in on first touch.
_MADV_POPULATE_READ = 22


class _Unmapper:
    def __init__(self, address: int, length: int):
        self.address, self.length = address, length

    def __del__(self):
        _libc.munmap(self.address, self.length)


def map_range(path: str, offset: int, length: int):
    """A writable (private, copy-on-write) buffer of `length` bytes of `path` from `offset`.

    Returns (buffer, start): the bytes asked for are buffer[start : start + length].
    """
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    span = offset - aligned + length
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, aligned)
    finally:
        os.close(fd)
    if address is None or address == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    _libc.madvise(address, span, _MADV_POPULATE_READ)
    buffer = (ctypes.c_ubyte * span).from_address(address)
    buffer._unmapper = _Unmapper(address, span)  # lives exactly as long as the buffer
    return buffer, offset - aligned
