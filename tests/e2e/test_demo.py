"""`keye-demo` end to end: synthetic shards through the pipeline into training; the loss goes down."""

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_and_learns(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "keye_train.cli.demo",
            "--steps",
            "12",
            "--samples",
            "40",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) over 12 steps", out).groups())
    assert last < first
