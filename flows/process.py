"""Process set-up for flow runs, and Prefect's temporary API started early.

Without ``PREFECT_API_URL`` Prefect starts a temporary API server (a uvicorn subprocess on a local
port) at the first flow call, after every import of the command, and waits seconds for it to answer.
The ``sacv`` commands that run flows call :func:`start_temporary_api` first instead: the subprocess
starts in a thread while the command imports the rest, and :func:`wait_for_temporary_api` (called by
``flows.runners.call_flow``) joins that thread before the first flow run, so Prefect's own start
finds it running (one ``SubprocessASGIServer()`` per process). Prefect stops it at exit, as before.
This module imports no Prefect at the top: the commands import it before anything heavy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

from sacv.errors import UserError

# Embedded default: a local ephemeral API without telemetry or the slow background services.
EMBEDDED_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED": "false",
    "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_ENABLED": "false",
}
# For every flow run process: the library's ``sacv`` logger goes to the run's logs too (read when
# Prefect sets up its logging; a worker's flow runs get it from the deployment's job variables).
LOGGING_SETTINGS = {"PREFECT_LOGGING_EXTRA_LOGGERS": "sacv"}
RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")  # Prefect's task and flow run loggers


class OneLineUserErrors(logging.Filter):
    """Drop the traceback of a ``sacv.errors.UserError`` from a run log record: the message (what
    to fix) is the record's own line and the failed state's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info = record.exc_text = None
        return True


_ONE_LINE = OneLineUserErrors()


def configure_process() -> None:
    """Set up this process for flow runs; idempotent, call before the first flow run starts.

    - Embedded-mode defaults (``EMBEDDED_SETTINGS``) and ``LOGGING_SETTINGS`` unless the environment
      sets them: the temporary local API is started as a subprocess that reads them from the environment.
    - User errors logged by Prefect's task and flow run loggers lose their traceback (``OneLineUserErrors``).
    - One glibc malloc arena: torch runs in task-runner threads, and glibc gives each thread its own
      arena, which maps and unmaps large tensors anew (measured: CPU extraction 20-25 % slower in a
      worker thread than in the main thread). It must be set before those threads allocate. Dask
      worker processes need ``MALLOC_ARENA_MAX=1`` in their environment instead.
    """
    for key, value in {**EMBEDDED_SETTINGS, **LOGGING_SETTINGS}.items():
        os.environ.setdefault(key, value)
    for name in RUN_LOGGERS:
        logging.getLogger(name).addFilter(_ONE_LINE)  # once: a filter already there is not added again
    if sys.platform == "linux":
        try:
            ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1
        except (OSError, AttributeError):
            pass


class _ServerStart(threading.Thread):
    """``server.start()`` in a thread; its error is kept for the joining thread."""

    def __init__(self, server) -> None:
        super().__init__(name="prefect-temporary-api-start")
        self.server = server
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.server.start()
        except BaseException as err:  # re-raised by wait_for_temporary_api
            self.error = err


_pending: _ServerStart | None = None


def start_temporary_api() -> bool:
    """Start Prefect's temporary API in a background thread unless an API URL is configured (or a
    start is pending); returns whether it started one. Prefect and the server's module are imported
    here, in the caller's thread; the thread only launches the subprocess and polls its health."""
    global _pending
    configure_process()  # the subprocess reads the embedded-mode defaults from the environment
    from prefect.settings import PREFECT_API_URL

    if _pending is not None or PREFECT_API_URL.value():
        return False
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.server.api.server import SubprocessASGIServer

    ensure_logging_setup()  # as ``import prefect.main`` would: the start is logged
    _pending = _ServerStart(SubprocessASGIServer())
    _pending.start()
    return True


def wait_for_temporary_api() -> None:
    """Join the start begun by :func:`start_temporary_api`, if any; re-raise its error."""
    global _pending
    start, _pending = _pending, None
    if start is None:
        return
    start.join()
    if start.error is not None:
        raise start.error
