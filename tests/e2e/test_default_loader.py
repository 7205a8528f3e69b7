"""A recipe with no loader override uses the planned loader: under TP2 only the replica's loading rank
reads shards, and keye-train builds the missing shard indexes itself."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import COMMON, metrics, run_env, train_command

from keye_train.data.synth.shards import SynthConfig, synth_dataset

pytestmark = [pytest.mark.slow, pytest.mark.dist]

# Imported by every Python process started with this directory on PYTHONPATH (torchrun's workers too):
# counts the opens of shard files by the real open(), whatever code path opens them, and writes the
# count per rank at exit.
SITECUSTOMIZE = """
import atexit, builtins, json, os
_real_open, _opens = builtins.open, []
def _open(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and str(file).endswith(".tar"):
        _opens.append(os.path.basename(str(file)))
    return _real_open(file, *args, **kwargs)
builtins.open = _open
@atexit.register
def _dump():
    if "RANK" in os.environ and os.environ.get("OPEN_LOG"):
        path = os.path.join(os.environ["OPEN_LOG"], "rank%s.json" % os.environ["RANK"])
        with _real_open(path, "w") as f:
            json.dump(_opens, f)
"""


def test_tp2_recipe_default_loader_rank1_opens_no_shard(tmp_path):
    data = synth_dataset(SynthConfig(out=tmp_path / "data", samples=20, seed=3))
    assert not list(Path(data["out"]).glob("*.idx.jsonl")), "the dataset must start without indexes"
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    logs = tmp_path / "opens"
    logs.mkdir()
    overrides = [
        "recipe=stage2_multitask",
        f"run_dir={tmp_path / 'run'}",
        "steps=2",
        "schedule.total_steps=2",
        f"data.manifest={data['manifest']}",
        "parallel=tp2",
        "data.microbatches=2",
        "checkpoint.interval_steps=100",
    ]
    env = run_env()
    env["PYTHONPATH"] = os.pathsep.join([str(hook), env.get("PYTHONPATH", "")])
    env["OPEN_LOG"] = str(logs)
    result = subprocess.run(
        train_command(nproc=2, port=29741, overrides=overrides + COMMON),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(metrics(tmp_path / "run")) == [0, 1]
    opens = {r: json.loads((logs / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert opens[1] == [], f"rank 1 (TP peer of the loading rank) opened shards: {opens[1]}"
    assert opens[0], "rank 0 loads the replica's samples: it must have read shards"
    # keye-train built every index (rank 0, progress bar), and the decoder kept each shard open: the
    # loading rank opened each shard once to index it and at most once per step to read samples.
    assert sorted(p.name for p in Path(data["out"]).glob("*.idx.jsonl")) == sorted(
        Path(s).name + ".idx.jsonl" for s in Path(data["out"]).glob("*.tar")
    )
    shards = len(list(Path(data["out"]).glob("*.tar")))
    assert len(opens[0]) <= shards + shards, sorted(opens[0])
    shutil.rmtree(hook)
