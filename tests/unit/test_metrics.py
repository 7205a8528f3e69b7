"""MetricsLogger: metrics.jsonl contents, sample-key hashes, rank-0-only output, wandb/TensorBoard paths."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import types
from pathlib import Path

import pytest

from keye_train.train.metrics import LoggingConfig, MetricsLogger, WandbConfig, keys_hash

QUIET = {"progress_bar": False, "wandb": WandbConfig(mode="disabled")}


def _step(logger: MetricsLogger, step: int, keys: list[str], **overrides: object) -> dict:
    values = {
        "loss": 2.5 - 0.1 * step,
        "lr": 1e-4,
        "grad_norm": 0.75,
        "tokens": 1000,
        "samples": len(keys),
        "step_time_s": 0.5,
        "sample_keys": keys,
    }
    return logger.log_step(step, **{**values, **overrides})


def _read(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="logging.log_interval"):
        LoggingConfig(log_interval=0)
    with pytest.raises(ValueError, match="logging.wandb.mode"):
        WandbConfig(mode="cloud")
    assert LoggingConfig(wandb={"mode": "online"}).wandb.mode == "online"
    assert LoggingConfig().wandb.mode == "disabled"  # quiet unless asked for (issue 13)


def test_jsonl_records_every_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with MetricsLogger(LoggingConfig(log_interval=2, **QUIET), run_dir=tmp_path, total_steps=3) as logger:
        _step(
            logger,
            0,
            ["a", "b"],
            flops_per_step=4e12,
            peak_flops=1e13,
            skipped_samples=1,
            rank_step_times_s=[1.0, 1.0, 2.0],
            rank_tokens=[10, 30],
        )
        # The file is flushed per step: readable while the run goes on.
        assert len(_read(tmp_path)) == 1
        _step(logger, 1, ["c"], loss=float("nan"), grad_norm=None, extra={"loss_vit": 0.25})
    first, second = _read(tmp_path)
    assert first["step"] == 0 and first["loss"] == 2.5 and first["lr"] == 1e-4 and first["grad_norm"] == 0.75
    assert first["tokens"] == 1000 and first["samples"] == 2 and first["step_time_s"] == 0.5
    assert first["tokens_per_s"] == 2000.0
    assert first["mfu"] == pytest.approx(4e12 / (0.5 * 1e13))
    assert first["skipped_samples"] == 1
    assert first["step_time_imbalance"] == pytest.approx(2.0 / (4.0 / 3))
    assert first["tokens_imbalance"] == pytest.approx(1.5)
    # Totals accumulate; a diverged loss is written as null (valid JSON), extras pass through.
    assert second["tokens_total"] == 2000 and second["samples_total"] == 3
    assert second["loss"] is None and second["grad_norm"] is None and second["mfu"] is None
    assert second["loss_vit"] == 0.25
    # The hash is sha256 over the length-prefixed keys, chained from sha256(b"") step by step.
    expected_step0 = hashlib.sha256(b"\0\0\0\0\0\0\0\x01a\0\0\0\0\0\0\0\x01b").hexdigest()
    assert first["step_hash"] == expected_step0
    running0 = hashlib.sha256(hashlib.sha256(b"").digest() + bytes.fromhex(expected_step0)).hexdigest()
    assert first["running_hash"] == running0
    # One console summary per log interval (step 1 is the second step).
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("step 1 loss n/a")


def test_hash_is_deterministic_and_order_sensitive(tmp_path: Path) -> None:
    def run(name: str, batches: list[list[str]]) -> str:
        with MetricsLogger(LoggingConfig(**QUIET), run_dir=tmp_path / name) as logger:
            for step, keys in enumerate(batches):
                record = _step(logger, step, keys)
        return record["running_hash"]

    batches = [["shard0/0", "shard0/1"], ["shard1/7", "shard0/2"]]
    assert run("a", batches) == run("b", batches)
    assert run("c", [batches[0], list(reversed(batches[1]))]) != run("a", batches)
    assert run("d", [batches[1], batches[0]]) != run("a", batches)
    assert keys_hash(["ab", "c"]) != keys_hash(["a", "bc"])
    assert keys_hash(["x"]) == keys_hash(["x"]) != keys_hash(["y"])


def test_resume_continues_the_running_hash(tmp_path: Path) -> None:
    batches = [[f"k{i}", f"k{i + 10}"] for i in range(4)]
    with MetricsLogger(LoggingConfig(**QUIET), run_dir=tmp_path / "full") as logger:
        uninterrupted = [_step(logger, s, keys) for s, keys in enumerate(batches)]
    with MetricsLogger(LoggingConfig(**QUIET), run_dir=tmp_path / "resumed") as logger:
        for s in range(2):
            _step(logger, s, batches[s])
        state = logger.state_dict()
    with MetricsLogger(LoggingConfig(**QUIET), run_dir=tmp_path / "resumed") as logger:
        logger.load_state_dict(state)
        for s in range(2, 4):
            _step(logger, s, batches[s])
    resumed = _read(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3]  # appended to the same file
    for got, want in zip(resumed, uninterrupted, strict=True):
        assert got["running_hash"] == want["running_hash"] and got["tokens_total"] == want["tokens_total"]


def test_only_rank0_writes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = LoggingConfig(
        log_interval=1, progress_bar=True, wandb=WandbConfig(mode="offline"), tensorboard=True
    )
    with MetricsLogger(cfg, run_dir=tmp_path / "run", rank=1, total_steps=2) as logger:
        record = _step(logger, 0, ["a"])
    assert not (tmp_path / "run").exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # no bar, no summary, no wandb warning
    assert record["running_hash"] == keys_hash_chain(["a"])  # the state still advances on every rank
    with MetricsLogger(
        LoggingConfig(log_interval=1, progress_bar=True, wandb=WandbConfig(mode="disabled")),
        run_dir=tmp_path / "run",
        rank=0,
        total_steps=2,
    ) as logger:
        _step(logger, 0, ["a"])
    captured = capsys.readouterr()
    assert "step 0 loss" in captured.out and "train" in captured.err  # summary line and tqdm bar
    assert len(_read(tmp_path / "run")) == 1


def keys_hash_chain(keys: list[str]) -> str:
    return hashlib.sha256(hashlib.sha256(b"").digest() + bytes.fromhex(keys_hash(keys))).hexdigest()


class _FakeWandb(types.ModuleType):
    def __init__(self) -> None:
        super().__init__("wandb")
        self.init_kwargs: dict | None = None
        self.logged: list[tuple[dict, int]] = []
        self.finished = False

    def init(self, **kwargs: object) -> _FakeWandb:
        self.init_kwargs = kwargs
        return self

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished = True


@pytest.mark.parametrize(
    ("mode", "api_key", "expected_mode", "warns"),
    [
        ("offline", "secret", "offline", False),
        ("online", None, "offline", True),
        ("online", "secret", "online", False),
    ],
)
def test_wandb_modes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    mode: str,
    api_key: str | None,
    expected_mode: str,
    warns: bool,
) -> None:
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    if api_key is None:
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
    else:
        monkeypatch.setenv("WANDB_API_KEY", api_key)
    cfg = LoggingConfig(progress_bar=False, wandb=WandbConfig(mode=mode, project="p", run_name="r"))
    with caplog.at_level(logging.WARNING), MetricsLogger(cfg, run_dir=tmp_path / "run") as logger:
        _step(logger, 0, ["a"])
    assert fake.init_kwargs["mode"] == expected_mode
    assert fake.init_kwargs["project"] == "p" and fake.init_kwargs["name"] == "r"
    assert ("WANDB_API_KEY is not set" in caplog.text) == warns
    data, step = fake.logged[0]
    assert step == 0 and data["loss"] == 2.5 and "running_hash" not in data
    assert fake.finished


def test_wandb_disabled_or_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    # Disabled: wandb is never imported (a broken install must not matter).
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with caplog.at_level(logging.WARNING):
        with MetricsLogger(LoggingConfig(**QUIET), run_dir=tmp_path / "a") as logger:
            _step(logger, 0, ["a"])
        assert caplog.text == ""
        # Enabled but not installed: a clear warning, and training metrics still go to the file.
        cfg = LoggingConfig(progress_bar=False, wandb=WandbConfig(mode="offline"))
        with MetricsLogger(cfg, run_dir=tmp_path / "b") as logger:
            _step(logger, 0, ["a"])
    assert "wandb is not installed" in caplog.text and "pip install wandb" in caplog.text
    assert len(_read(tmp_path / "b")) == 1


def test_tensorboard_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    scalars = []

    class Writer:
        def __init__(self, log_dir: str) -> None:
            self.log_dir = log_dir

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def close(self) -> None:
            scalars.append(("closed", 0, 0))

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    cfg = LoggingConfig(progress_bar=False, wandb=WandbConfig(mode="disabled"), tensorboard=True)
    with MetricsLogger(cfg, run_dir=tmp_path / "tb") as logger:
        _step(logger, 3, ["a"])
    assert ("train/loss", 2.2, 3) in [(t, pytest.approx(v), s) for t, v, s in scalars]
    assert scalars[-1][0] == "closed"
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with caplog.at_level(logging.WARNING), MetricsLogger(cfg, run_dir=tmp_path / "tb2") as logger:
        _step(logger, 0, ["a"])
    assert "tensorboard package is not installed" in caplog.text
