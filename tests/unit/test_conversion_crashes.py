"""Conversions leave only their target (issue 21): kill -9 at 5 points of export, import and merge, then
the same command again; SIGTERM/SIGINT clean up on the way out; a full or read-only disk is one line.

The kills are deterministic: KEYE_KILL_AT (checkpoint/kill_points.py) makes the conversion SIGKILL itself
at a named point. Each killed conversion is a process forked from the suite's preloaded fork server (the
one tests/distributed/harness.py uses), so it starts in milliseconds; the reruns run in this process.
"""

import errno
import hashlib
import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
import torch.multiprocessing as mp
from safetensors import SafetensorError

import keye_train.checkpoint.safetensors_io as safetensors_io
import keye_train.checkpoint.staging as staging
from keye_train.checkpoint import kill_points
from keye_train.checkpoint.dcp import checkpoint_problem, iter_model_tensors
from keye_train.checkpoint.hf import save_keye_hf
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.cli.convert import main as convert_main
from keye_train.cli.data import main as data_main
from keye_train.cli.merge import main as merge_main
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model

CLI = {"convert": convert_main, "merge": merge_main}
_CONTEXT = mp.get_context("forkserver")
_CONTEXT.set_forkserver_preload(["keye_train.testing.rank_preload"])  # the harness's server and list


def _commands(sources: dict[str, Path], out: Path) -> dict[str, tuple[str, list[str]]]:
    """conversion -> (CLI, argv writing `out`)."""
    merge = [
        "--input",
        str(sources["dcp"]),
        "--input",
        str(sources["hf"]),
        "--out",
        str(out),
        "--dtype",
        "fp32",
    ]
    return {
        "export": (
            "convert",
            ["export", "--ckpt", str(sources["dcp"]), "--out", str(out), "--dtype", "fp32"]
            + ["--max-shard-size", "200KB"],
        ),
        "import": ("convert", ["import", "--hf", str(sources["hf"]), "--out", str(out)]),
        "merge_hf": ("merge", [*merge, "--format", "hf"]),
        "merge_dcp": ("merge", [*merge, "--format", "dcp"]),
    }


# conversion -> the 5 points (KEYE_KILL_AT values) it is killed at.
KILLS = {
    "export": [
        "staging.created",
        "shard.written#1",
        "shard.written#3",
        "weights.written",
        "staging.complete",
    ],
    "import": ["source.read#1", "source.read#3", "staging.created", "dcp.written", "staging.complete"],
    "merge": [
        ("merge_hf", "staging.created"),
        ("merge_hf", "shard.written#1"),
        ("merge_hf", "weights.written"),
        ("merge_dcp", "dcp.written"),
        ("merge_dcp", "staging.complete"),
    ],
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A DCP stage dir (model A) and a 5-shard fp32 Hugging Face dir (model B) of the tiny model."""
    root = tmp_path_factory.mktemp("crash_sources")
    model_a, model_b = build_model(tiny(), seed=0), build_model(tiny(), seed=1)
    CheckpointManager(CheckpointConfig(dir=str(root / "dcp")), log=lambda _: None).save(
        1, TrainState(model=model_a, optimizer=torch.optim.SGD(model_a.parameters()))
    )
    save_keye_hf(model_b.state_dict(), cfg=tiny(), out_dir=root / "hf", dtype="fp32", max_shard_bytes=200_000)
    return {"dcp": root / "dcp", "hf": root / "hf"}


def _run(conversion: str, sources, out: Path) -> int:
    tool, argv = _commands(sources, out)[conversion]
    return CLI[tool](argv)


@pytest.fixture(scope="module")
def references(sources, tmp_path_factory):
    """Each conversion's output, uninterrupted: what every killed-then-rerun one must equal."""
    root = tmp_path_factory.mktemp("crash_references")
    for conversion in _commands(sources, root):
        assert _run(conversion, sources, root / conversion) == 0
    return root


def _contents(out: Path) -> dict:
    """What a target must equal: every file's bytes (Hugging Face), or the tensors of a DCP checkpoint
    whose marker's checksums verify (DCP's .metadata holds a random save id, so bytes differ)."""
    if (out / "config.json").is_file():
        return {
            str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*"))
            if p.is_file()
        }
    assert checkpoint_problem(out) is None
    return {key: hashlib.sha256(t.numpy().tobytes()).hexdigest() for key, t in iter_model_tensors(out)}


def _killed(tool: str, argv: list[str], kill_at: str) -> None:
    """In the forked process: the conversion, with a SIGKILL at `kill_at`."""
    os.environ[kill_points.ENV] = kill_at
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    raise SystemExit(CLI[tool](argv))


@pytest.mark.parametrize("kind", sorted(KILLS))
def test_kill_9_at_5_points_then_rerun_leaves_only_the_target(kind, sources, references, tmp_path, capsys):
    for number, point in enumerate(KILLS[kind]):
        conversion, kill_at = point if isinstance(point, tuple) else (kind, point)
        parent = tmp_path / str(number)
        parent.mkdir()
        out = parent / "out"
        tool, argv = _commands(sources, out)[conversion]
        process = _CONTEXT.Process(target=_killed, args=(tool, argv, kill_at))
        process.start()
        process.join(120)
        assert process.exitcode == -signal.SIGKILL, f"{conversion} did not reach {kill_at}"
        assert not out.exists(), kill_at
        if not kill_at.startswith("source."):  # killed while writing: its staging dir is left behind
            assert [p.name.startswith(".out.tmp-") for p in parent.iterdir()] == [True], kill_at
        assert _run(conversion, sources, out) == 0, kill_at  # the same command again
        assert [p.name for p in parent.iterdir()] == ["out"], kill_at
        assert _contents(out) == _contents(references / conversion), kill_at
    assert "removed" in capsys.readouterr().out  # the rerun said what it swept


@pytest.mark.parametrize(
    ("conversion", "kill_at", "code"),
    [
        ("export", "shard.written#2:TERM", 128 + signal.SIGTERM),
        ("import", "dcp.written:INT", 128 + signal.SIGINT),
        ("merge_hf", "weights.written:TERM", 128 + signal.SIGTERM),
    ],
)
def test_sigterm_and_sigint_remove_the_staging_dir(
    conversion, kill_at, code, sources, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(kill_points, "_passes", Counter())
    monkeypatch.setenv(kill_points.ENV, kill_at)
    handler = signal.getsignal(signal.SIGTERM)
    assert _run(conversion, sources, tmp_path / "out") == code
    assert list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err.splitlines()
    assert err[-1].endswith(f"stopped by {signal.Signals(code - 128).name}; unfinished output removed")
    assert signal.getsignal(signal.SIGTERM) == handler  # the caller's handler is back


def _no_space_in_safetensors(*args, **kwargs):
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _no_space_in_dcp(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # a failed write() names no file


def _read_only_mkdtemp(*args, dir=None, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)


@pytest.mark.parametrize(
    ("conversion", "where", "refuse", "code"),
    [
        ("export", (safetensors_io, "save_file"), _no_space_in_safetensors, errno.ENOSPC),
        ("import", (dcp_filesystem, "_write_item"), _no_space_in_dcp, errno.ENOSPC),
        ("merge_hf", (safetensors_io, "save_file"), _no_space_in_safetensors, errno.ENOSPC),
        ("merge_dcp", (dcp_filesystem, "_write_item"), _no_space_in_dcp, errno.ENOSPC),
        ("export", (staging.tempfile, "mkdtemp"), _read_only_mkdtemp, errno.EROFS),
    ],
)
def test_a_full_or_read_only_disk_is_one_line(
    conversion, where, refuse, code, sources, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(*where, refuse)
    out = tmp_path / "out"
    assert _run(conversion, sources, out) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write {out}: {os.strerror(code)} ({errno.errorcode[code]})" in err
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging dir


def test_keye_data_convert_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    records = tmp_path / "texts.jsonl"
    records.write_text('{"text": "hello"}\n')
    out = tmp_path / "shards"

    def no_space(self, data):
        with open(self, "wb") as f:
            f.write(data[:10])  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", no_space)
    assert data_main(["convert", "--format", "text", str(records), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"cannot write {out / 'text-000000.tar'}: No space left on device (ENOSPC)" in err
    assert list(out.iterdir()) == []  # the half-written temp file is gone
