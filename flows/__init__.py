"""Prefect flows: compose the tasks, fan out, choose the task runner. No maths here."""

import ctypes
import os
import sys

# Embedded default: a local ephemeral API without telemetry or the slow background services.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
}.items():
    os.environ.setdefault(_key, _value)

if sys.platform == "linux":
    # Torch runs in task-runner threads. glibc gives each thread its own malloc arena, which maps and
    # unmaps large tensors anew (measured: CPU extraction 20-25 % slower in a worker thread than in
    # the main thread). One shared arena removes the gap; it must be set before threads allocate,
    # hence here. Dask worker processes need MALLOC_ARENA_MAX=1 in their environment instead.
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
    except (OSError, AttributeError):
        pass
