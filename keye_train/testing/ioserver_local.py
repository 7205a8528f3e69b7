"""A `keye-ioserver` subprocess on this host, for tests and benchmarks, stopped with exactly its processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class LocalServer:
    """A `keye-ioserver` subprocess on this host (tests, benchmarks); stop() ends exactly its processes."""

    def __init__(
        self,
        tokenizer: str | Path,
        *,
        workers: int = 1,
        extra_args: list[str] | None = None,
        bind: str = "tcp://127.0.0.1:0",
        start_timeout_s: float = 180.0,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "keye_train.cli.ioserver",
            "--bind",
            bind,
            "--workers",
            str(workers),
            "--tokenizer",
            str(tokenizer),
            *(extra_args or []),
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            self.proc.wait(timeout=start_timeout_s)
            raise RuntimeError(f"keye-ioserver exited with {self.proc.returncode} before announcing itself")
        info = json.loads(line)
        self.address: str = info["address"]
        self.worker_pids: list[int] = info["worker_pids"]

    def stop(self, *, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout_s)
        _reap_workers(self.worker_pids, timeout_s=timeout_s)
        if self.proc.stdout:
            self.proc.stdout.close()


def _reap_workers(pids: list[int], *, timeout_s: float) -> None:
    """Workers leave on their own when their broker is gone; kill any of ours that has not."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid) and _is_spawned_worker(pid):  # the pid may have been reused by now: check
            os.kill(pid, signal.SIGKILL)


def _is_spawned_worker(pid: int) -> bool:
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, parent not reaped yet) still answers signal 0; /proc tells them apart on Linux.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True
