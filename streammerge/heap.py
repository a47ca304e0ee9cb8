"""How the C heap hands freed memory back to the system during a merge (glibc on Linux only).

A merge allocates and frees the same few sizes over and over: a block's float32 copies, torch's temporaries of
the eager methods, numpy's scratch. glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with a fresh
``mmap`` and gives it back on free, and trims a heap whose free top passes ``M_TRIM_THRESHOLD``. It adapts both
as it sees large blocks freed, yet in threads other than the main one (the compute workers, readers and writer)
freed blocks of a few MiB still went back to the system, so every block's temporaries were fresh pages: zeroed by
the kernel on the first touch, and on a VM whose balloon reports free pages to the host, faulted in from the
hypervisor (``bench/page_cost.py``: 2.47 s of CPU per GiB into fresh pages, 0.18 into reused ones). In a thread,
allocating and freeing 1–3 MiB arrays 40 times faulted 17 763 pages with glibc's defaults and 1 281 with the
settings here (``tests/test_heap.py``); arcee_fusion's one-thread merge of the 0.5B bench set spent 1.6 s in
``torch.softmax`` with the defaults, 0.7 s with them (bench/README.md).

:func:`keep_freed_memory` sets both thresholds once, before the merge allocates its buffers: allocations under
32 MiB (glibc's largest ``M_MMAP_THRESHOLD``) come from the heaps, and a heap keeps up to the plan's peak of free
memory for the next block. A heap only keeps memory the merge used before and uses again, so the peak RSS stays
within the plan's budget (bench/README.md: within 3% of glibc's defaults at 256 and 512 MiB). Between the eager
path's many temporaries it keeps holes, as glibc's defaults do: the planner counts those blocks
``planner.EAGER_HEAP_SLACK`` times over. The setting is the
process's (in the Python API, the caller's) and stays after the merge. A ``GLIBC_TUNABLES`` that sets a
``glibc.malloc`` tunable is the user's choice, and then nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

#: ``mallopt`` parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: glibc refuses an ``M_MMAP_THRESHOLD`` above half its 64 MiB heap size on 64-bit systems
MMAP_THRESHOLD = 32 << 20
#: the least free memory a heap keeps (a plan's peak can be smaller than a few blocks of a large tensor)
MIN_TRIM_THRESHOLD = 64 << 20


def glibc() -> bool:
    """Whether this process runs on glibc (``os.confstr``: no file scan, unlike ``platform.libc_ver``)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def keep_freed_memory(peak_bytes: int) -> bool:
    """Set glibc's ``M_MMAP_THRESHOLD`` to 32 MiB and ``M_TRIM_THRESHOLD`` to ``peak_bytes`` (at least 64 MiB,
    at most 2 GiB − 1: ``mallopt`` takes an int) for this process; see the module docstring. Returns whether both
    were set: False off glibc, when ``GLIBC_TUNABLES`` sets a malloc tunable, or when ``mallopt`` refuses."""
    if not glibc() or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trim = min(max(peak_bytes, MIN_TRIM_THRESHOLD), 2**31 - 1)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, trim))
