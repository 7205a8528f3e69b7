"""`keye-data calibrate` warns on a degenerate fit and writes where it says (issue 13)."""

import json

from keye_train.cli import data as data_cli
from keye_train.data.plan.cost import Measurement


def _write(path, rows) -> str:
    path.write_text(json.dumps([m.__dict__ for m in rows]))
    return str(path)


def test_a_degenerate_fit_is_reported(tmp_path, capsys, monkeypatch):
    # ViT timings that do not grow with size (pure per-call overhead): a ViT that costs nothing.
    rows = [Measurement("vit", s, 0.01) for s in (16, 64, 256)]
    rows += [Measurement("llm", s, 1e-6 * s + 1e-9 * s * s) for s in (128, 512, 2048)]
    monkeypatch.chdir(tmp_path)
    out = "sub/cost.json"  # relative: written and reported against the working directory, absolute
    assert (
        data_cli.main(["calibrate", "--measurements", _write(tmp_path / "m.json", rows), "--out", out]) == 0
    )
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["out"] == str(tmp_path / "sub" / "cost.json") and (tmp_path / "sub" / "cost.json").is_file()
    assert any("vit fit is degenerate" in w for w in report["warnings"])
    assert "warning: the vit fit is degenerate" in captured.err
    fit = json.loads((tmp_path / "sub" / "cost.fit.json").read_text())
    assert fit["warnings"] == report["warnings"]


def test_a_good_fit_has_no_warning(tmp_path, capsys):
    rows = [Measurement(p, s, 1e-6 * s + 1e-9 * s * s + 1e-4) for p in ("vit", "llm") for s in (16, 64, 256)]
    out = tmp_path / "cost.json"
    args = ["calibrate", "--measurements", _write(tmp_path / "m.json", rows), "--out", str(out)]
    assert data_cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["warnings"] == []
