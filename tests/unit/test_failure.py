"""One-line failures (issue 13): the OS cause and path, the traceback in a file, once across ranks."""

import errno
import os

from keye_train.cli import failure
from keye_train.cli.failure import one_line, report_failure


def _raise_and_report(exc, run_dir, monkeypatch, *, rank: int) -> int:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        raise exc
    except type(exc) as caught:
        return report_failure(caught, run_dir=str(run_dir))


def test_an_os_error_names_path_and_cause():
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/step-9/__0_0.distcp")
        except OSError as err:
            raise RuntimeError("save failed") from err
    except RuntimeError as err:
        line = one_line(err)
    assert line.startswith("cannot write /ckpt/step-9/__0_0.distcp: No space left on device (ENOSPC)")


def test_the_same_error_on_two_ranks_is_printed_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(failure, "SAME_ERROR_WAIT_S", 0.5)
    assert _raise_and_report(ValueError("bad shard x.tar"), tmp_path, monkeypatch, rank=0) == 1
    assert _raise_and_report(ValueError("bad shard x.tar"), tmp_path, monkeypatch, rank=1) == 1
    # A different error on rank 1 concerns that rank: it is printed.
    assert _raise_and_report(ValueError("rank 1 only"), tmp_path, monkeypatch, rank=1) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("keye-train: error on rank 0: bad shard x.tar (traceback: ")
    assert len(err) == 2 and err[1].startswith("keye-train: error on rank 1: rank 1 only")
    for rank in (0, 1):
        text = (tmp_path / "logs" / f"error-rank{rank}.log").read_text()
        assert "Traceback (most recent call last)" in text and "ValueError" in text


def test_the_same_error_on_two_ranks_other_than_0_is_printed_once(tmp_path, monkeypatch, capsys):
    """Ranks 1 and 3 read the same bad file while rank 0 is fine: rank 1 prints, rank 3 stays silent,
    and an older log of an earlier run does not silence anyone."""
    monkeypatch.setattr(failure, "SAME_ERROR_WAIT_S", 0.3)
    stale = tmp_path / "logs" / "error-rank2.log"
    stale.parent.mkdir()
    stale.write_text("bad shard y.tar\n")
    os.utime(stale, (failure._STARTED - 60, failure._STARTED - 60))
    assert _raise_and_report(ValueError("bad shard x.tar"), tmp_path, monkeypatch, rank=1) == 1
    assert _raise_and_report(ValueError("bad shard x.tar"), tmp_path, monkeypatch, rank=3) == 1
    assert _raise_and_report(ValueError("bad shard y.tar"), tmp_path, monkeypatch, rank=4) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("keye-train: error on rank 1: bad shard x.tar")
    assert err[1].startswith("keye-train: error on rank 4: bad shard y.tar")
    assert (tmp_path / "logs" / "error-rank3.log").read_text().startswith("bad shard x.tar\n")
