"""Named points where a crash test can kill -9 this process deterministically, instead of by timing.

`KEYE_KILL_AT=NAME` (or `NAME#K`) makes the process SIGKILL itself the first (K-th) time it passes the point
NAME; the tests of conversions and of preemption set it. Unset, a point costs one environment lookup.

The points: `checkpoint.start`, `checkpoint.written` (files written, no marker yet) and `checkpoint.saved`
(marker written) in the trainer's CheckpointManager.save; `staging.created`, `shard.written` (each
safetensors shard), `weights.written` (every shard and config.json), `dcp.written` (a model-only DCP
checkpoint's files, no marker yet), `staging.complete` (just before the rename into place) in the
conversions; `source.read` after each source shard an import reads.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "KEYE_KILL_AT"
_passes: Counter[str] = Counter()


def kill_point(name: str) -> None:
    """SIGKILL this process when KEYE_KILL_AT names this point and this is the pass it counts to."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted, _, count = spec.partition("#")
    if wanted != name:
        return
    _passes[name] += 1
    if _passes[name] == int(count or 1):
        print(f"{ENV}={spec}: kill -9 of process {os.getpid()}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
