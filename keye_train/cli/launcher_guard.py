"""Workers stop when their launcher dies.

torchrun's agent starts the workers as its children; if the agent is killed (kill -9, a lost SLURM step)
nothing tells them, and they keep training into the run directory (issue 13: 10 more steps). A daemon
thread watches the parent pid: when the parent is gone the worker gets SIGTERM, which the trainer turns
into "checkpoint this step and exit", and if it is still alive `grace_s` later (blocked in a collective
with a peer that died too) it exits hard. Linux's PR_SET_PDEATHSIG would signal at once but is not
portable and fires on the death of the spawning *thread*; polling once a second is enough here.
"""

from __future__ import annotations

import os
import signal
import threading
import time

DEFAULT_GRACE_S = 30.0


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_RESTART_COUNT" in os.environ


def watch_launcher(*, grace_s: float = DEFAULT_GRACE_S, poll_s: float = 1.0) -> threading.Thread | None:
    """Starts the watcher under torchrun (returns it); does nothing for a plain process (returns None)."""
    if not launched_by_torchrun():
        return None
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        rank = os.environ.get("RANK", "?")
        print(f"keye-train: rank {rank}: the launcher (pid {parent}) is gone; stopping", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)  # still here: blocked on a peer that died with the launcher

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
