"""What the layout tests' fork server imports once, before it forks the ranks (tests/distributed/harness.py).

Every rank of every layout test needs torch's distributed stack and the trainer; importing them is
~4 CPU-seconds per interpreter. Imports only: the ranks are forked from this process, so nothing here may
initialise a process group or run a parallel op (the library threads torch and numpy start at import are
fork-safe, as for DataLoader's forked workers).
"""

import os

import torch.distributed.pipelining  # noqa: F401
import torch.distributed.tensor  # noqa: F401

import keye_train.checkpoint.manager  # noqa: F401
import keye_train.config.loader  # noqa: F401
import keye_train.data.loader.planned  # noqa: F401
import keye_train.distributed.context_parallel  # noqa: F401
import keye_train.distributed.parallelize  # noqa: F401
import keye_train.distributed.pipeline  # noqa: F401
import keye_train.distributed.vision  # noqa: F401
import keye_train.train.build  # noqa: F401
import keye_train.train.step  # noqa: F401

# A rank whose parent is this process was forked with the imports above already done.
SERVER_PID = os.getpid()
