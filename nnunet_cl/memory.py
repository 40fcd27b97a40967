"""Process-level memory settings for CPU training."""
import ctypes
import ctypes.util
import os

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_mmap_threshold(threshold_bytes: int = 131072) -> bool:
    """Make glibc return freed blocks of at least `threshold_bytes` to the system at once.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so later blocks of a
    few MiB come from the heap and stay there after they are freed. A contrastive loss computed in blocks
    of a few MiB then leaves hundreds of MB of freed memory in the process: peak resident memory of a
    batch-5 Hippocampus step with the 4096-voxel loss core was 1.28x to 1.55x a plain step with the default
    and 1.03x with a fixed 128 KiB threshold (benchmarks/results/step_cost_hippocampus.md). Same effect as exporting
    MALLOC_MMAP_THRESHOLD_=131072 before Python starts.

    Does nothing (returns False) when that variable is set, so the user's choice wins, or when the C
    library is not glibc (macOS, musl). Returns True when the threshold was set.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))
