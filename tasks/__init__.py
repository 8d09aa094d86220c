"""Prefect tasks: thin wrappers that take references, call `sacv`, and return references."""

import ctypes
import sys

if sys.platform == "linux":
    # Torch runs in task-runner threads. Each glibc thread arena maps and unmaps large tensors anew
    # (measured: CPU extraction 20-25 % slower in a worker thread than in the main thread);
    # one shared arena removes the gap. Harmless where libc is not glibc.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
    except (OSError, AttributeError):
        pass
