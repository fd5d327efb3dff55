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
import weakref

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value

# A memoryview straight over the mapped bytes: unlike a ctypes array it needs no new ctypes type
# per distinct length (type creation dominated the per-tensor cost of small tensors).
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.restype = ctypes.py_object
_memory_view.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int]
_PYBUF_WRITE = 0x200

# Pages come in by page faults as the caller touches them; each fault maps a whole run of cached
# pages (the kernel's fault-around), so this costs less than MADV_POPULATE_READ, which walks the
# range page by page before anyone reads it, and it lets a multi-threaded consumer fault in
# parallel. MADV_SEQUENTIAL asks for aggressive read-ahead when the file is not cached yet, and
# spares the page cache the "recently used" marking at unmap (a one-pass read should not evict
# everything else).
_MADV_SEQUENTIAL = 2


class TruncatedError(OSError):
    """The file is shorter than the range asked for (mapping it would fault on access)."""


def map_range(path: str, offset: int, length: int) -> tuple[memoryview, int]:
    """A writable (private, copy-on-write) buffer of `length` bytes of `path` from `offset`.

    Returns (buffer, start): the bytes asked for are buffer[start : start + length]. The mapping is
    released when the buffer (and everything holding it, e.g. a tensor from torch.frombuffer) is gone.
    """
    aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
    span = offset - aligned + length
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < offset + length:
            raise TruncatedError(f"{path} is shorter than {offset + length} bytes")
        address = _libc.mmap(None, span, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, aligned)
    finally:
        os.close(fd)
    if address is None or address == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    _libc.madvise(address, span, _MADV_SEQUENTIAL)
    buffer = _memory_view(address, span, _PYBUF_WRITE)
    # Not at interpreter exit: tensors may still point into the mapping while the process shuts down.
    weakref.finalize(buffer, _libc.munmap, address, span).atexit = False
    return buffer, offset - aligned
