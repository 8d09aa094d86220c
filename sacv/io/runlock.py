"""One run at a time per run directory: ``RUN/lock.json`` names its holder.

The lock record is ``{host, pid, started, heartbeat, token, command}``. It is created exclusively
(``RunDir.create_lock``, ``sacv.io.storage.create_whole``: a hard link on local disk; on S3 a PUT
with ``If-None-Match: *``, which the server refuses when the key exists; elsewhere write, then read
back and compare). The holder rewrites ``heartbeat`` every ``ttl_s / 4`` seconds. A second run
finds the record and stops with a message naming the lock and the holder (or waits up to
``wait_s`` for it to go). A lock is stale, and is taken over, when its holder's process is gone
(same host, pid not alive) or its heartbeat is older than ``ttl_s`` (a holder on another host that
died).

Residual race, on every filesystem: two runs that find the same stale lock at the same moment both
delete it and create their own; the later creation wins. Each taker reads the lock back after
``SETTLE_S`` seconds and gives up if the token is not its own, so both hold it only when one
delete+create pair takes longer than ``SETTLE_S``. Exclusive creation of a fresh lock has no race on
local disk and S3; on other object stores it has the same read-back window.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from datetime import UTC, datetime

from sacv.errors import UserError
from sacv.io.rundir import RunDir

SETTLE_S = 1.0


class RunLocked(UserError, RuntimeError):
    """The run directory is in use by another run (the message names it)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_reason(record: dict, ttl_s: float, now: float | None = None) -> str | None:
    """Why the lock ``record`` is stale (its holder is dead), or None while it may be alive."""
    now = time.time() if now is None else now
    if record.get("host") == socket.gethostname() and not _alive(int(record.get("pid", -1))):
        return f"process {record.get('pid')} on this host is gone"
    age = now - float(record.get("heartbeat", 0))
    if age > ttl_s:
        return f"no heartbeat for {age:.0f} s (> lock_ttl_s = {ttl_s:g})"
    return None


def describe(record: dict) -> str:
    return (
        f"host {record.get('host')}, pid {record.get('pid')}, started {record.get('started')} "
        f"({record.get('command', '?')})"
    )


class RunLock:
    """The lock held by this process on ``run``; :meth:`release` (or ``with``) gives it back."""

    def __init__(self, run: RunDir, ttl_s: float):
        self.run, self.ttl_s = run, ttl_s
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "heartbeat": time.time(),
            "token": uuid.uuid4().hex,
            "command": " ".join(sys.argv)[:300],
        }
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _owned(self) -> bool:
        return (self.run.read_lock() or {}).get("token") == self.record["token"]

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if self._owned():
                self.record["heartbeat"] = time.time()
                self.run.write_lock(self.record)

    def _start(self) -> RunLock:
        self._beat = threading.Thread(target=self._heartbeat, name="sacv-lock-heartbeat", daemon=True)
        self._beat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self._owned():
            self.run.remove_lock()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(run: RunDir, wait_s: float = 0, ttl_s: float = 120, poll_s: float = 1.0) -> RunLock:
    """Take ``RUN/lock.json`` for this process, taking over a stale one; raise :class:`RunLocked`
    when another live run holds it for longer than ``wait_s`` seconds."""
    lock = RunLock(run, ttl_s)
    deadline = time.monotonic() + wait_s
    while True:
        lock.record["heartbeat"] = time.time()
        if run.create_lock(lock.record):
            return lock._start()
        holder = run.read_lock()
        if holder is not None and stale_reason(holder, ttl_s) is not None:
            run.remove_lock()  # stale: take it over, then check nobody else did the same
            if run.create_lock(lock.record):
                time.sleep(SETTLE_S)
                if lock._owned():
                    return lock._start()
            continue
        if holder is not None and time.monotonic() >= deadline:
            raise RunLocked(
                f"{run.lock_uri} is held by another run: {describe(holder)}. Wait for it to finish, or "
                f"set execution.lock_wait_s to wait for it; a lock whose holder died is taken over "
                f"once its process is gone (same host) or after lock_ttl_s = {ttl_s:g} s without heartbeat."
            )
        time.sleep(poll_s)
