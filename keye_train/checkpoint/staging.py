"""Where conversions write before their output exists: one hidden staging dir beside the target.

Every conversion (init, export, import, merge) writes into `.NAME.tmp-PID-RANDOM` beside its target NAME
and renames it to NAME when complete, so a failure never leaves a half-written NAME. A failure or a
SIGTERM/SIGINT (the CLIs turn them into exceptions) removes the staging dir on the way out; a kill -9
cannot, so the next conversion sweeps what killed ones left (remove_stale_staging). The sweep reads the
target and the writer's pid from the name, so it also recognises the forms earlier versions wrote
(`.NAME.tmp-PID`, `.NAME.tmp-RANDOM`, `.NAME.export-PID`, and the nested `..NAME.export-PID.tmp-RANDOM`
of an export).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from keye_train.checkpoint.kill_points import kill_point
from keye_train.checkpoint.verify import root_os_error

_STAGING = re.compile(r"^\.(?P<target>.+)\.(?:tmp|export)-(?P<suffix>[^/]+)$")


def staging_owner(name: str) -> tuple[str, int | None] | None:
    """(target name, writer pid or None) of a staging dir's name; None when `name` is not one."""
    match = _STAGING.match(name)
    if match is None:
        return None
    digits = re.match(r"\d+", match["suffix"])
    pid = int(digits.group()) if digits else None
    inner = staging_owner(match["target"])  # a staging dir of a staging dir (old nested exports)
    if inner is not None:
        return inner[0], pid if pid is not None else inner[1]
    return match["target"], pid


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(target: str | Path, *, log: Callable[[str], None] = print) -> list[Path]:
    """Removes the staging dirs beside `target` that killed conversions left; returns them.

    A staging dir of `target` itself is stale unless its writer still runs (a concurrent conversion of
    the same target is left to fail on its own); one of another target is stale when its writer's pid is
    known and no longer running. Each removal is logged with its size.
    """
    target = Path(target).absolute()
    parent = target.parent
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir()):
        owner = staging_owner(entry.name)
        if owner is None or not entry.is_dir():
            continue
        name, pid = owner
        if _pid_alive(pid) or (name != target.name and pid is None):
            continue
        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        log(f"removed {entry} ({size} bytes), the staging dir of an earlier interrupted conversion")
        removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output_dir(target: str | Path, *, log: Callable[[str], None] = print) -> Iterator[Path]:
    """Yields a fresh staging dir beside `target`, renamed to `target` on success and removed on any
    failure (an exception, or a signal the CLIs turn into one). `target` must not exist yet; stale
    staging dirs of earlier killed conversions are swept first."""
    target = Path(target).absolute()
    if target.exists():
        raise FileExistsError(f"output directory {target} already exists; remove it or choose another path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(target, log=log)
        temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    except OSError as err:
        raise OutputWriteError(err.errno, err.strerror or str(err), str(target)) from err
    try:
        kill_point("staging.created")
        yield temp
        # mkdtemp makes the dir private (0700); the finished model gets the permissions of a plain mkdir.
        umask = os.umask(0)
        os.umask(umask)
        temp.chmod(0o777 & ~umask)
        kill_point("staging.complete")
        os.replace(temp, target)
    except BaseException as exc:
        shutil.rmtree(temp, ignore_errors=True)
        failure = _failed_write(exc, target=target, temp=temp)
        if failure is exc:
            raise
        raise failure from exc


class OutputWriteError(OSError):
    """A conversion's write the file system refused (disk full, read-only, ...), named by its target."""

    detail = "nothing was written there"


def _failed_write(exc: BaseException, *, target: Path, temp: Path) -> BaseException:
    """`exc`, unless it is (or wraps, as DCP does) an OSError of a write into the staging dir: then an
    OutputWriteError naming `target` (the staging dir is gone, and DCP's error names no file at all)."""
    os_error = root_os_error(exc)
    if os_error is None or (os_error.filename and not str(os_error.filename).startswith(str(temp))):
        return exc
    return OutputWriteError(os_error.errno, os_error.strerror or str(os_error), str(target))
