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

# A page-cache folio of 2 MiB (ext4 and others keep large folios, e.g. for a file just written) is
# mapped by one page-table entry only if the mapping covers its whole 2 MiB-aligned stretch of the
# file. So a large range is mapped out to those boundaries (the kernel then places it 2 MiB-aligned
# too); the caller still sees only its own bytes. The price: a live tensor may also map up to 2 MiB
# of each neighbour, page cache shared with nothing new allocated, but counted in RSS (holding every
# tensor of a 1.6 GB checkpoint at once showed ~15% more RSS; streaming, at most 4 MiB per live
# tensor). Ranges under 2 MiB are not widened: no whole folio to gain, and many live small tensors
# would each pull in megabytes of neighbours.
_HUGE = 2 * 1024 * 1024
_WIDEN_FROM = _HUGE


class TruncatedError(OSError):
    """The file is shorter than the range asked for (mapping it would fault on access)."""


def map_range(path: str, offset: int, length: int) -> tuple[memoryview, int]:
    """A writable (private, copy-on-write) buffer of `length` bytes of `path` from `offset`.

    Returns (buffer, start): the bytes asked for are buffer[start : start + length]. The mapping is
    released when the buffer (and everything holding it, e.g. a tensor from torch.frombuffer) is gone.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        file_size = os.fstat(fd).st_size
        if file_size < offset + length:
            raise TruncatedError(f"{path} is shorter than {offset + length} bytes")
        first, end = _mapped_span(offset, length, file_size)
        address = _libc.mmap(None, end - first, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, first)
    finally:
        os.close(fd)
    if address is None or address == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    _libc.madvise(address, end - first, _MADV_SEQUENTIAL)
    buffer = _memory_view(address, end - first, _PYBUF_WRITE)
    # Not at interpreter exit: tensors may still point into the mapping while the process shuts down.
    weakref.finalize(buffer, _libc.munmap, address, end - first).atexit = False
    return buffer, offset - first


def _mapped_span(offset: int, length: int, file_size: int) -> tuple[int, int]:
    """The [first, end) file bytes to map for the range: page-aligned, widened to 2 MiB boundaries
    (never past the file's last page) when the range is large."""
    page = mmap.ALLOCATIONGRANULARITY
    if length < _WIDEN_FROM:
        return offset - offset % page, offset + length
    last_page_end = -(-file_size // page) * page
    return offset - offset % _HUGE, min(-(-(offset + length) // _HUGE) * _HUGE, last_page_end)
