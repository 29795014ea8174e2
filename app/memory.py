"""Resident memory: the peak, and what numba's compiler leaves mapped once the kernels are warm.

Most of a warm start's memory is LLVM (docs/memory.md): loading numba maps
its 170 MB library and runs its initialisers, and even with every kernel in
numba's cache, numba compiles its runtime (NRT) at the first call, which runs
LLVM's optimiser and code generator: about 40 MiB of LLVM's machine code
paged in for 0.05 s of work. Those pages are clean, read-only file pages:
dropping them from this process (madvise MADV_DONTNEED) costs nothing but a
page fault per page should LLVM run again, and the page cache keeps them for
the next process. warm_numba() drops them between the steps that touch them,
so the peak holds one step's worth instead of all of them, and returns the C
heap's freed memory to the system (malloc_trim).

Linux only; elsewhere (and under an emulator that ignores madvise) every
function here is a harmless no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import resource
import sys

log = logging.getLogger(__name__)

MADV_DONTNEED = 4
# The compiler: only its read-only mappings without a written page are dropped
# (clean_mappings), so dropping can never lose data.
COMPILER_LIBRARIES = ("libllvmlite",)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mib() -> float | None:
    """Resident memory now, MiB (None where /proc is absent)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def peak_rss_mib() -> float:
    """The process's peak resident memory so far, MiB (VmHWM; ru_maxrss where /proc is absent)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":  # bytes there
            kib //= 1024
    return kib / 1024


def clean_mappings(names=COMPILER_LIBRARIES, smaps: str = "/proc/self/smaps") -> list[tuple[int, int]]:
    """(start, end) of the named libraries' read-only mappings that hold no written page.

    A mapping that is not writable and has no anonymous (copied-on-write) page
    is the file's bytes as they are on disk: its pages can be dropped and read
    back. The relocated ones (RELRO, written by the loader, then made
    read-only) have anonymous pages and are left alone.
    """
    out = []
    current = None
    try:
        with open(smaps, encoding="utf-8", errors="replace") as f:
            for line in f:
                head, _, rest = line.partition(" ")
                if "-" in head and not head.endswith(":"):
                    parts = line.split(maxsplit=5)
                    current = None
                    if len(parts) == 6 and "w" not in parts[1] and any(n in parts[5] for n in names):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        current = (start, end)
                elif head == "Anonymous:" and current is not None:
                    if int(rest.split()[0]) == 0:
                        out.append(current)
                    current = None
    except (OSError, ValueError):
        return []
    return out


def release_compiler_pages() -> int:
    """Drop LLVM's machine code from this process's resident set and trim the C heap; bytes dropped."""
    if _LIBC is None:
        return 0
    dropped = 0
    for start, end in clean_mappings():
        if _LIBC.madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += end - start
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:  # not glibc
        pass
    return dropped


def warm_numba() -> None:
    """Bring up numba's runtime (the NRT compile, the lowering registries) a step at a time.

    What numba does anyway at its first call, in the same order; done here the
    LLVM pages each step touches are dropped before the next, so the peak is
    one step's. Call after importing the kernels, before the first of them runs.
    """
    try:
        from numba.core.registry import cpu_target  # loads LLVM and runs its initialisers
        from numba.core.runtime import rtsys
    except ImportError as exc:
        log.debug("numba's runtime not warmed in steps: %s", exc)
        return
    release_compiler_pages()  # the initialisers' pages
    try:
        ctx = cpu_target.target_context
        rtsys.initialize(ctx)  # compiles the NRT: LLVM's optimiser and code generator
        release_compiler_pages()
        ctx.refresh()  # imports numba's lowering registries (Python objects, little LLVM)
    except AttributeError as exc:  # another numba: its first call does the same, all at once
        log.debug("numba's runtime not warmed in steps: %s", exc)
    release_compiler_pages()
