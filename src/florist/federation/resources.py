"""Resource readings a process reports about itself."""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def proc_status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


def reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current resident set."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def set_mmap_threshold(size: int) -> None:
    """glibc's mallopt(M_MMAP_THRESHOLD, size); a no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, size)  # -3 is M_MMAP_THRESHOLD in malloc.h
    except OSError:
        pass
