"""Named points where a crash test can kill -9 this process deterministically, instead of by timing.

`KEYE_KILL_AT=NAME` (or `NAME#K`) makes the process SIGKILL itself the first (K-th) time it passes the point
NAME; `NAME#K:TERM` (or `:INT`) sends that signal instead. The tests of conversions and of preemption set
it; unset, a point costs one environment lookup.

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
    """Signal this process when KEYE_KILL_AT names this point and this is the pass it counts to."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, signal_name = spec.partition(":")
    wanted, _, count = point.partition("#")
    if wanted != name:
        return
    _passes[name] += 1
    if _passes[name] == int(count or 1):
        sig = signal.Signals[f"SIG{signal_name or 'KILL'}"]
        print(f"{ENV}={spec}: sending {sig.name} to process {os.getpid()}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), sig)
