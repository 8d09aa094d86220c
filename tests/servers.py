"""Real servers on loopback for the tests: an S3-compatible object store (moto's stand-alone server)
and a Dask scheduler with worker processes, each a subprocess started from its command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Dummy credentials: the S3 clients read them from the environment, as they would in a cloud.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after ``timeout`` s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


def _wait_until(ready, what: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log.read_text()[-2000:]}")
        if ready():
            return
        time.sleep(0.2)
    stop(process)
    raise RuntimeError(f"{what} not ready after {timeout} s:\n{log.read_text()[-2000:]}")


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    @property
    def options(self) -> dict:
        """fsspec/s3fs options for this server (credentials come from the environment)."""
        return {"client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"}}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.options, skip_instance_cache=True)

    def create_bucket(self, name: str) -> str:
        """Create the bucket (s3fs.mkdir fails on this server); return ``s3://name``."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"


def start_s3(log: Path, timeout: float = 30) -> S3Server:
    """``moto_server`` on a free loopback port; stop it with ``stop(server.process)``."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **S3_ENV},
    )
    endpoint = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1).close()
            return True
        except OSError:
            return False

    _wait_until(ready, "moto_server", process, log, timeout)
    return S3Server(endpoint, process)


def upload(fs, local: Path, url: str) -> None:
    """Copy every file under the local folder ``local`` to ``url`` (same relative paths)."""
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{url.removeprefix('s3://')}/{path.relative_to(local).as_posix()}", path.read_bytes())


@dataclass
class DaskCluster:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]

    def stop(self) -> None:
        for process in [*self.workers, self.scheduler]:
            stop(process)


def start_dask(
    n_workers: int, log_dir: Path, env: dict, timeout: float = 90, per_worker: list[dict] | None = None
) -> DaskCluster:
    """``dask scheduler`` and ``n_workers`` × ``dask worker --nthreads 1`` on loopback, each its own
    process group started from the command line with ``env`` (worker i's updated with ``per_worker[i]``);
    returns when every worker has joined."""
    from distributed import Client

    dask = [sys.executable, "-m", "dask"]  # the `dask` command of this interpreter (also where no script is on PATH)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"

    def spawn(args: list[str], name: str, extra: dict | None = None) -> subprocess.Popen:
        log = log_dir / f"{name}.log"
        return subprocess.Popen(
            dask + args,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**env, **(extra or {})},
        )

    scheduler = spawn(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"], "scheduler")
    workers = [
        spawn(
            [
                "worker",
                address,
                "--nthreads",
                "1",
                "--nworkers",
                "1",
                "--no-dashboard",
                "--host",
                "127.0.0.1",
                "--name",
                f"w{i}",
            ],
            f"worker{i}",
            per_worker[i] if per_worker else None,
        )
        for i in range(n_workers)
    ]
    cluster = DaskCluster(address, scheduler, workers)
    try:
        with Client(address, timeout=timeout) as client:
            client.wait_for_workers(n_workers, timeout=timeout)
    except Exception:
        cluster.stop()
        logs = "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(log_dir.glob("*.log")))
        raise RuntimeError(f"the Dask cluster did not start:\n{logs}") from None
    return cluster
