"""Threads for the work on one video (decoding runs, resizes): how many, and an in-order map over them.

PyAV releases the GIL while decoding and converting frames and torch does inside its kernels, so Python
threads run these on separate cores; results are collected in submission order, so they do not depend
on which thread finished first.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

AUTO_MAX = 8  # threads=0 takes at most this many: each decoding thread holds its own decoder's frames


def worker_count(threads: int) -> int:
    """`threads`, or for 0 one per CPU this process may run on (its affinity mask, not the machine's),
    at most AUTO_MAX."""
    if threads > 0:
        return threads
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, AUTO_MAX))


def ordered_map(fn: Callable[[T], R], items: Sequence[T], threads: int) -> Iterator[R]:
    """fn over items on `threads` threads, yielded in item order. At most 2 x threads results are held
    ahead of the consumer, so a map over large outputs does not keep them all."""
    if threads <= 1 or len(items) <= 1:
        yield from (fn(item) for item in items)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        inflight: deque = deque()
        for item in items:
            inflight.append(pool.submit(fn, item))
            if len(inflight) >= 2 * threads:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()


def chunks(n: int, parts: int) -> list[range]:
    """range(n) cut into at most `parts` contiguous, nearly equal ranges."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]
