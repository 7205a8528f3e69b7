"""How a keye-train run fails: one line on the console, from the rank that failed; the traceback in a log
file; torchrun's error file so the launcher names the root cause (torch.distributed.elastic `record`).

An error every rank hits alike (a bad config, a refused resume) is printed by rank 0 only: the other
ranks stay silent and give the launcher a moment to stop them, so the operator reads it once. Any other
error is printed by the lowest rank that hit it: a rank stays silent when a lower rank logged the very
same line during this run (several ranks reading the same bad file print it once, not once per rank).

The other commands (keye-convert, keye-merge, keye-data) fail in the same one-line style through
run_command, which also turns SIGTERM/SIGINT into an exception so that their staging dirs are cleaned.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import get_error_handler

from keye_train.checkpoint.verify import root_os_error

LOG_DIR = "logs"  # under run_dir: error-rank<N>.log holds the traceback of a failed rank
# Ranks other than 0 wait this long for the launcher to stop them after an error that rank 0 reports.
FOLLOWER_GRACE_S = 30.0
# A rank other than 0 waits this long for lower ranks' logs before printing its own line: when one of them
# failed with the same message (a bug, a bad file several ranks read), the operator reads it once.
SAME_ERROR_WAIT_S = 3.0
_STARTED = time.time()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# errno -> (what failed, the fix, with {target} the setting that names where the command writes)
_OS_ERRORS = {
    errno.ENOSPC: ("cannot write", "; free space there or point {target} elsewhere"),
    errno.EDQUOT: ("cannot write", "; free space there or point {target} elsewhere"),
    errno.EROFS: ("cannot write", "; the file system is read-only: choose a writable {target}"),
    errno.EACCES: ("cannot write", "; make it writable or choose another {target}"),
    errno.ENOENT: ("cannot find", ""),
}
TRAIN_TARGET = "run_dir/checkpoint.dir"


def describe_os_error(err: OSError, *, target: str = TRAIN_TARGET) -> str:
    """'cannot write PATH: No space left on device (ENOSPC); ...'-style text naming the path, the cause and
    the fix; `target` is the setting that chooses where the command writes."""
    code = errno.errorcode.get(err.errno or 0, "")
    cause = (err.strerror or str(err)) + (f" ({code})" if code else "")
    path = err.filename or "a file"
    verb, hint = _OS_ERRORS.get(err.errno or 0, ("cannot use", ""))
    detail = getattr(err, "detail", "")
    return f"{verb} {path}: {cause}" + (f"; {detail}" if detail else "") + hint.format(target=target)


def one_line(exc: BaseException, *, target: str = TRAIN_TARGET) -> str:
    """The console line of an error: the OS cause when there is one, else the exception's first line."""
    os_error = root_os_error(exc)
    if os_error is not None:
        return describe_os_error(os_error, target=target)
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def write_traceback(exc: BaseException, *, run_dir: str | None) -> Path:
    """The traceback in run_dir/logs/error-rank<N>.log, or in the temp dir when run_dir is not writable.
    Its first line is the console line's message (what other ranks compare theirs with)."""
    text = one_line(exc) + "\n\n" + "".join(traceback.format_exception(exc))
    name = f"error-rank{_rank()}.log"
    candidates = [Path(run_dir) / LOG_DIR] if run_dir else []
    candidates.append(Path(tempfile.gettempdir()) / f"keye-train-{os.getpid()}")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text)
            return path
        except OSError:
            continue
    return Path("<unwritable>")


def report_failure(exc: BaseException, *, run_dir: str | None, prefix: str = "keye-train") -> int:
    """Log, record and print one failure; returns the exit code (1)."""
    shared = getattr(exc, "same_on_every_rank", False)
    rank = _rank()
    if shared and rank != 0:
        # Rank 0 reports it; stay quiet until the launcher stops this rank (or give up after a while).
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            time.sleep(FOLLOWER_GRACE_S)
        return 1
    log_path = write_traceback(exc, run_dir=run_dir)
    with contextlib.suppress(OSError):
        get_error_handler().record_exception(exc)  # torchrun's error file, when it set one
    if rank != 0 and run_dir and _lower_rank_failed_alike(exc, run_dir=run_dir, rank=rank):
        return 1  # a lower rank prints the same line; this rank's traceback is in its log all the same
    where = f" on rank {rank}" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    print(f"{prefix}: error{where}: {one_line(exc)} (traceback: {log_path})", file=sys.stderr, flush=True)
    return 1


def _lower_rank_failed_alike(exc: BaseException, *, run_dir: str, rank: int) -> bool:
    """Whether a rank below `rank` logged the same one-line error during this run (within
    SAME_ERROR_WAIT_S). Only the logs present are read: a rank that has not failed has none."""
    line = one_line(exc)
    deadline = time.monotonic() + SAME_ERROR_WAIT_S
    while True:
        # One directory listing per poll, not a stat per lower rank: thousands of ranks may be polling.
        for log in (Path(run_dir) / LOG_DIR).glob("error-rank*.log"):
            other = log.stem.removeprefix("error-rank")
            if not other.isdigit() or int(other) >= rank:
                continue
            with contextlib.suppress(OSError):
                if log.stat().st_mtime >= _STARTED and log.read_text().split("\n", 1)[0] == line:
                    return True  # (an older log is an earlier run's)
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def run_reporting(fn: Callable[[], int], *, run_dir: Callable[[], str | None]) -> int:
    """fn(); any exception becomes one reported failure (KeyboardInterrupt and SystemExit pass)."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        return report_failure(exc, run_dir=run_dir())


# --------------------------------------------------------------------------- the other commands

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """SIGTERM or SIGINT during a command, raised in the main thread so that every cleanup on the way out
    runs (a conversion's staging dir is removed). A BaseException: `except Exception` does not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def run_command(fn: Callable[[], int], *, prog: str, target: str, error_code: int = 1) -> int:
    """fn() of a command other than keye-train (keye-convert, keye-merge, keye-data), failing as training
    does: a bad input or an OS error (disk full, read-only, a missing source) is one line on stderr naming
    the path and the cause, with the fix (`target`: the option naming where the command writes).

    SIGTERM and SIGINT raise Interrupted, so the staging dir is removed before the process exits with
    128 + the signal; further signals are ignored meanwhile, so the cleanup itself is not cut short.
    Anything else (a bug) keeps its traceback.
    """
    received: list[int] = []

    def stop(signum: int, frame: object) -> None:
        for sig in _STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        received.append(signum)
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in _STOP_SIGNALS}
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - DCP wraps what it caught in a BaseException
        if received:  # the Interrupted itself, or whatever wraps it (DCP's CheckpointException)
            name = signal.Signals(received[0]).name
            print(f"{prog}: stopped by {name}; unfinished output removed", file=sys.stderr, flush=True)
            return 128 + received[0]
        if isinstance(exc, (KeyboardInterrupt, SystemExit)) or not (
            isinstance(exc, (ValueError, RuntimeError, OSError)) or root_os_error(exc) is not None
        ):
            raise
        print(f"{prog}: error: {one_line(exc, target=target)}", file=sys.stderr, flush=True)
        return error_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
