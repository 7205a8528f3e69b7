"""Which run a run dir holds: its recipe, a hash of the config keys that define it, and a random id.

Written at a run's first start to RUN_DIR/run_identity.json and to its checkpoint dir (train/preflight.py),
and kept by every later start of the same run: a resume, an elastic resume under another layout, and a
restart from step 0 after a preemption that came before the first complete checkpoint. Every checkpoint
records the run id in its meta; a run started from another (stage.init_from) records that run's id.

The identity config is the resolved config without the keys of MAY_CHANGE_ON_RESUME: a later start of the
run may change those (and only those), anything else is another run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from keye_train.checkpoint.identity import IDENTITY_FILE, read_identity, write_identity

# Keys (and sections) that a later start of the same run may change; docs/recipes.md lists them too.
MAY_CHANGE_ON_RESUME = (
    "run_dir",  # a run dir may be moved or copied
    "resume",
    "fresh_run",
    "steps",  # extending a run
    "schedule.total_steps",
    "parallel",  # elastic resume: another layout ...
    "data.microbatches",  # ... with the same global batch
    "checkpoint",  # its dir moves with run_dir; interval, keep_last, async: operations
    "logging",
    "peak_tflops",
    "max_nonfinite_steps",
    "data.prefetch",  # how the data is read, not which
    "data.workers",
    "data.build_index",
    "data.ioserver",
    "data.eval_manifest",
    "data.eval_interval",
    "data.eval_batches",
    "model.attn_backend",  # kernels and number formats
    "optim.impl",
    "precision",
    "optim.lr",  # lowered after a loss spike
    "stage.init_from",  # read at the first start only; a resume loads the run's own checkpoint
)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping):
        flat: dict[str, Any] = {}
        for key, value in data.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: data}


def _may_change(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in MAY_CHANGE_ON_RESUME)


def identity_config(cfg: Any) -> dict[str, Any]:
    """The dotted keys and values of the config that define the run (JSON values: tuples are lists)."""
    flat = _flatten(dataclasses.asdict(cfg))
    chosen = {key: value for key, value in sorted(flat.items()) if not _may_change(key)}
    return json.loads(json.dumps(chosen, default=str))


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def new_run_id() -> str:
    """Start time and randomness: unique across runs, readable in a listing."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(4)


@dataclasses.dataclass
class RunIdentity:
    recipe: str
    config: dict[str, Any]
    run_id: str = dataclasses.field(default_factory=new_run_id)
    # Where the run keeps its checkpoints: relative to its run_dir when inside it, so a copied or moved
    # run dir still names its own.
    checkpoint_dir: str = ""
    init_from: dict[str, Any] | None = None  # {path, run_id, recipe} of the run this one started from
    created: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S"))

    @classmethod
    def of(cls, cfg: Any, *, recipe: str, init_from: dict[str, Any] | None = None) -> RunIdentity:
        """A new identity for the config `cfg` (TrainConfig) of recipe `recipe`."""
        run_dir, ckpt = Path(cfg.run_dir).absolute(), Path(cfg.checkpoint.dir).absolute()
        inside = ckpt.is_relative_to(run_dir)
        return cls(
            recipe=recipe,
            config=identity_config(cfg),
            checkpoint_dir=str(ckpt.relative_to(run_dir) if inside else ckpt),
            init_from=init_from,
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunIdentity:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in fields})

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"config_hash": config_hash(self.config)}

    def checkpoint_path(self, run_dir: str | Path) -> Path:
        return Path(run_dir).absolute() / self.checkpoint_dir

    def describe(self) -> str:
        return f"run {self.run_id} (recipe {self.recipe or '?'}, config {config_hash(self.config)})"

    def differences(self, other: RunIdentity) -> list[str]:
        """'key: ours vs theirs' for every identity key (and the recipe) that differs."""
        found = [f"recipe: {self.recipe} vs {other.recipe}"] if self.recipe != other.recipe else []
        for key in sorted(set(self.config) | set(other.config)):
            mine, theirs = self.config.get(key, "<unset>"), other.config.get(key, "<unset>")
            if mine != theirs:
                found.append(f"{key}: {mine!r} vs {theirs!r}")
        return found


def same_path(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def load_identity(directory: str | Path) -> RunIdentity | None:
    """The identity recorded in a run dir or checkpoint dir; None when it has none."""
    record = read_identity(directory)
    return None if record is None else RunIdentity.from_record(record)


def _check_config(saved: RunIdentity, identity: RunIdentity, *, where: str) -> None:
    differing = saved.differences(identity)
    if differing:
        raise ValueError(
            f"{where} holds {saved.describe()}, whose config differs from this launch's in "
            f"{'; '.join(differing[:4])} (earlier vs now): relaunch it with its values, pass fresh_run=true "
            "to start over, or use another run_dir (stage.init_from= to start from its weights)"
        )


def check_own_run(
    *, run_dir: str | Path, checkpoint_dir: str | Path | None, identity: RunIdentity, records: int
) -> bool:
    """Whether run_dir holds this run (the identity has this config) and `checkpoint_dir` (None: no
    checkpoints) is its checkpoint dir. False when run_dir records no identity (a run from before
    identities: nothing to compare); ValueError naming both when the config differs or the checkpoint dir
    belongs to another run or is not the one the run recorded (mistyped, or moved)."""
    saved = load_identity(run_dir)
    if saved is None:
        return False
    _check_config(saved, identity, where=f"run_dir {run_dir}")
    if checkpoint_dir is None:
        return True
    ckpt = Path(checkpoint_dir)
    own_dir = saved.checkpoint_path(run_dir)
    holder = load_identity(ckpt) if ckpt.is_dir() else None
    if holder is not None and holder.run_id != saved.run_id:
        raise ValueError(
            f"checkpoint.dir {ckpt} holds the checkpoints of {holder.describe()}, but run_dir {run_dir} "
            f"holds {saved.describe()}, whose checkpoints are in {own_dir}; point checkpoint.dir there, "
            "or use another run_dir for this launch"
        )
    if holder is None and not same_path(ckpt, own_dir):
        state = "does not exist" if not ckpt.exists() else "holds no checkpoint of it"
        raise ValueError(
            f"checkpoint.dir {ckpt} {state}, but run_dir {run_dir} holds {saved.describe()} ({records} step "
            f"records), whose checkpoints are in {own_dir}; point checkpoint.dir there, or pass "
            "fresh_run=true to start over"
        )
    return True


def settle_identity(
    identity: RunIdentity,
    *,
    run_dir: str | Path,
    checkpoint_dir: str | Path | None,
    continues: bool,
    log: Callable[[str], None],
) -> RunIdentity:
    """The identity this start runs under, written to the checkpoint dir (None: none) and run_dir.

    A start that `continues` (a resume, a restart from step 0) keeps the run's id, found in run_dir or,
    for a new run_dir continuing a checkpoint dir, there; anything else (a first start, a run dir from
    before identities) records `identity`.
    """
    saved = None
    if continues:
        saved = load_identity(run_dir)
        if saved is None and checkpoint_dir is not None:
            saved = load_identity(checkpoint_dir)
            if saved is not None:
                _check_config(saved, identity, where=f"checkpoint.dir {checkpoint_dir}")
    if saved is not None:
        identity = dataclasses.replace(
            identity, run_id=saved.run_id, created=saved.created, init_from=saved.init_from
        )
    else:
        log(f"keye-train: {identity.describe()}, recorded in {Path(run_dir) / IDENTITY_FILE}")
    # The checkpoint dir first: a run_dir's identity always has its checkpoint dir's beside it.
    if checkpoint_dir is not None:
        write_identity(checkpoint_dir, identity.record())
    write_identity(run_dir, identity.record())
    return identity
