"""launch/ scripts: syntax, shellcheck, --help, dry-run commands, a real torchrun start, signal handling."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = [LAUNCH / "torchrun.sh", LAUNCH / "slurm.sbatch", LAUNCH / "curriculum.sh"]
VENV_BIN = str(Path(sys.executable).parent)  # torchrun lives beside this python


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RDZV_", "MASTER_", "NODE_"))}
    env.pop("DRY_RUN", None)
    env["PATH"] = f"{VENV_BIN}:{env['PATH']}"
    env.update(extra)
    return env


def _run(
    args: list[str], *, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *map(str, args)],
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def _commands(stdout: str) -> list[list[str]]:
    return [line[2:].split() for line in stdout.splitlines() if line.startswith("+ ")]


def _fake(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_syntax_shellcheck_and_help(script: Path) -> None:
    assert _run(["-n", script]).returncode == 0
    first_lines = script.read_text().splitlines()[:20]
    assert "set -euo pipefail" in script.read_text() and first_lines[0] == "#!/usr/bin/env bash"
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout
    for flag in ("--help", "-h"):
        result = _run([script, flag])
        assert result.returncode == 0 and result.stdout.startswith("Usage:"), result.stderr


def test_torchrun_single_node_dry_run() -> None:
    result = _run(
        [LAUNCH / "torchrun.sh", "4", "recipe=stage2_multitask", "parallel.tp=2"], env=_env(DRY_RUN="1")
    )
    assert result.returncode == 0, result.stderr
    (cmd,) = _commands(result.stdout)
    torchrun = cmd[cmd.index("torchrun") :]
    assert "--standalone" in torchrun and "--nproc-per-node=4" in torchrun
    assert not any(a.startswith("--rdzv") for a in torchrun)
    assert torchrun[-4:] == ["--no-python", "keye-train", "recipe=stage2_multitask", "parallel.tp=2"]
    assert "PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in cmd


@pytest.mark.parametrize(
    ("env", "args", "endpoint", "node_rank"),
    [
        ({"RDZV_ENDPOINT": "node7:1234"}, ["--nnodes", "3"], "node7:1234", None),
        (
            {"MASTER_ADDR": "node1", "MASTER_PORT": "4321"},
            ["--nnodes=2", "--node-rank", "1"],
            "node1:4321",
            "1",
        ),
        ({"MASTER_ADDR": "node1"}, ["--nnodes", "2", "--rdzv-endpoint", "h:9"], "h:9", None),
        ({"MASTER_ADDR": "node1", "SLURM_NODEID": "1"}, ["--nnodes", "2"], "node1:29500", "1"),
    ],
)
def test_torchrun_multi_node_rendezvous(
    env: dict, args: list[str], endpoint: str, node_rank: str | None
) -> None:
    result = _run([LAUNCH / "torchrun.sh", *args, "8", "recipe=stage3_anneal"], env=_env(DRY_RUN="1", **env))
    assert result.returncode == 0, result.stderr
    (cmd,) = _commands(result.stdout)
    assert "--rdzv-backend=c10d" in cmd and f"--rdzv-endpoint={endpoint}" in cmd
    assert "--standalone" not in cmd and "--nproc-per-node=8" in cmd
    assert f"--nnodes={args[1] if args[0] == '--nnodes' else args[0].split('=')[1]}" in cmd
    assert (f"--node-rank={node_rank}" in cmd) == (node_rank is not None)
    assert cmd[-1] == "recipe=stage3_anneal"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nnodes", "2", "8"], "rendezvous endpoint"),
        (["x", "recipe=a"], "NPROC=x"),
        ([], "NPROC"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:1", "8"], "--node-rank=2"),
    ],
)
def test_torchrun_errors(args: list[str], message: str) -> None:
    result = _run([LAUNCH / "torchrun.sh", *args], env=_env(DRY_RUN="1"))
    assert result.returncode == 2 and message in result.stderr


def test_torchrun_really_starts_workers_and_forwards_sigusr1(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    trainer = _fake(
        tmp_path / "bin",
        "fake-train",
        'echo "rank=$RANK world=$WORLD_SIZE args=$*" >> "$OUT_FILE"\n'
        'trap \'kill "$pid"; echo "rank=$RANK checkpointed on USR1" >> "$OUT_FILE"; exit 0\' USR1\n'
        'if [[ "${WAIT_SIGNAL:-0}" == 1 ]]; then sleep 60 >/dev/null 2>&1 & pid=$!; wait $pid; fi\n',
    )
    env = _env(OUT_FILE=str(out), KEYE_TRAIN_CMD=str(trainer), WAIT_SIGNAL="1")
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "torchrun.sh"), "2", "recipe=x", "run_dir=/tmp/a b"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
            assert proc.poll() is None, "torchrun exited before its workers started"
            time.sleep(0.2)
        # Both workers run with torchrun's environment and the overrides intact (space included).
        assert sorted(out.read_text().splitlines()) == [
            f"rank={r} world=2 args=recipe=x run_dir=/tmp/a b" for r in (0, 1)
        ]
        os.kill(proc.pid, signal.SIGUSR1)  # torchrun.sh exec'd torchrun: same pid
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = out.read_text().splitlines()
    assert sorted(line for line in lines if "USR1" in line) == [
        f"rank={r} checkpointed on USR1" for r in (0, 1)
    ]


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    _fake(
        bin_dir,
        "scontrol",
        'echo "scontrol $*" >> "$LOG_FILE"\n'
        'if [[ "$1 $2" == "show hostnames" ]]; then printf "gpu-a17\\ngpu-a18\\n"; fi\n',
    )
    _fake(
        bin_dir,
        "srun",
        'echo "srun $*" >> "$LOG_FILE"\n'
        'trap \'kill "$pid"; echo "srun got USR1" >> "$LOG_FILE"; exit 0\' USR1\n'
        'if [[ -n "${SRUN_EXIT:-}" ]]; then exit "$SRUN_EXIT"; fi\n'
        "sleep 60 >/dev/null 2>&1 & pid=$!\n"
        'echo started >> "$LOG_FILE"; wait $pid\n',
    )
    env = _env(
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-a[17-18]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_SUBMIT_DIR=str(ROOT),
        GPUS_PER_NODE="4",
        LOG_FILE=str(tmp_path / "log.txt"),
        **extra,
    )
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_slurm_dry_run_rendezvous_on_first_host(tmp_path: Path) -> None:
    env = _slurm_env(tmp_path, DRY_RUN="1", SLURM_RESTART_COUNT="1")
    result = _run([LAUNCH / "slurm.sbatch", "recipe=stage2_multitask", "run_dir=/ckpt/s2"], env=env)
    assert result.returncode == 0, result.stderr
    srun, node0 = _commands(result.stdout)
    assert srun[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert srun[4] == str(LAUNCH / "torchrun.sh")
    assert srun[5:] == [
        "--nnodes", "2", "--rdzv-endpoint", "gpu-a17:29500", "--rdzv-id", "4242", "4",
        "recipe=stage2_multitask", "run_dir=/ckpt/s2", "resume=true",
    ]  # fmt: skip
    for arg in ("--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-a17:29500", "--rdzv-id=4242"):
        assert arg in node0
    assert "--nproc-per-node=4" in node0 and "--node-rank=0" in node0
    assert "scontrol show hostnames gpu-a[17-18]" in (tmp_path / "log.txt").read_text()
    # Outside an allocation it refuses to run.
    result = _run([LAUNCH / "slurm.sbatch"], env=_env())
    assert result.returncode == 2 and "not inside a Slurm allocation" in result.stderr


def test_slurm_usr1_is_forwarded_and_the_job_requeued(tmp_path: Path) -> None:
    env = _slurm_env(tmp_path)
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "recipe=a"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (log.exists() and "started" in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 does
    _, err = proc.communicate(timeout=20)
    lines = log.read_text().splitlines()
    assert proc.returncode == 0, err
    assert "srun got USR1" in lines and lines[-1] == "scontrol requeue 4242"
    assert "requeueing job 4242" in err.decode()


def test_slurm_stops_a_trainer_that_outlives_kill_wait_and_requeues(tmp_path: Path) -> None:
    """After SIGTERM Slurm SIGKILLs the job KillWait seconds later: the script must still requeue."""
    env = _slurm_env(tmp_path, KEYE_KILL_WAIT_S="4")  # the fake srun ignores SIGTERM
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(
        ["bash", str(LAUNCH / "slurm.sbatch"), "recipe=a"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (log.exists() and "started" in log.read_text()):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)  # the fake srun would sleep 60 s
    assert proc.returncode == 0, err
    assert "did not stop within 2s of SIGTERM (KillWait 4s)" in err.decode()
    assert log.read_text().splitlines()[-1] == "scontrol requeue 4242"


def test_slurm_refuses_a_missing_virtualenv(tmp_path: Path) -> None:
    env = _slurm_env(tmp_path, KEYE_VENV=str(tmp_path / "no_venv"))
    result = _run([LAUNCH / "slurm.sbatch", "recipe=a"], env=env)
    assert result.returncode == 2 and f"no virtualenv at {tmp_path / 'no_venv'}" in result.stderr


def test_slurm_failure_is_not_requeued(tmp_path: Path) -> None:
    result = _run([LAUNCH / "slurm.sbatch", "recipe=a"], env=_slurm_env(tmp_path, SRUN_EXIT="3"))
    assert result.returncode == 3
    assert "requeue" not in (tmp_path / "log.txt").read_text()


def _curriculum_commands(stdout: str) -> dict[str, list[str]]:
    names, commands = [], []
    for line in stdout.splitlines():
        if line.startswith("== "):
            names.append(line[3:])
        elif line.startswith("+ "):
            commands.append(line[2:].split())
    return dict(zip(names, commands, strict=True))


def _overrides(cmd: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in cmd if "=" in a and not a.startswith("-"))


def test_curriculum_dry_run_chains_stages(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    args = [LAUNCH / "curriculum.sh", "--out", out, "--nproc", "2", "--init-from", "/hf/init", "model=tiny"]
    mix_b = ["--mix-b", "data.shares={video: 0.3, text: 0.7}", "--mix-b", "seed=7"]
    result = _run([*args, *mix_b], env=_env(DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    cmds = _curriculum_commands(result.stdout)
    assert list(cmds) == ["stage0", "stage1", "stage2", "stage3:mix_a", "stage3:mix_b", "merge", "export"]
    recipes = ["stage0_vit", "stage1_align", "stage2_multitask", "stage3_anneal_128k", "stage3_anneal_128k"]
    previous = "/hf/init"
    for (name, cmd), recipe in zip(list(cmds.items())[:5], recipes, strict=True):
        o = _overrides(cmd)
        assert cmd[0] == str(LAUNCH / "torchrun.sh") and cmd[1] == "2", name
        assert o["recipe"] == recipe and o["stage.init_from"] == previous and o["model"] == "tiny", name
        if name != "stage3:mix_a":  # both anneals start from stage 2
            previous = o["run_dir"]
    a, b = _overrides(cmds["stage3:mix_a"]), _overrides(cmds["stage3:mix_b"])
    assert a["run_dir"] != b["run_dir"] and "seed" not in a and b["seed"] == "7"
    # The override with spaces survives as one argument (printed shell-quoted).
    assert "data.shares=\\{video:\\ 0.3\\,\\ text:\\ 0.7\\}" in result.stdout
    merge = cmds["merge"]
    inputs = [merge[i + 1] for i, x in enumerate(merge) if x == "--input"]
    assert merge[0] == "keye-merge" and inputs == [a["run_dir"], b["run_dir"]]
    merged = merge[merge.index("--out") + 1]
    export = cmds["export"]
    assert export[:2] == ["keye-convert", "export"] and export[export.index("--ckpt") + 1] == merged
    assert not out.exists()  # a dry run creates nothing

    result = _run([*args, *mix_b, "--start-at", "stage3"], env=_env(DRY_RUN="1"))
    assert result.stdout.count("skipped") == 3 and len(_commands(result.stdout)) == 4
    for bad in ([], ["--mix-b", "seed=1", "--mix-a", "seed=1"], [*mix_b, "--start-at", "stage9"]):
        result = _run([*args, *bad], env=_env(DRY_RUN="1"))
        assert result.returncode == 2 and "curriculum.sh:" in result.stderr


def test_curriculum_stops_at_first_failure(tmp_path: Path) -> None:
    log = tmp_path / "calls.txt"
    launcher = _fake(
        tmp_path / "bin",
        "fake-launch",
        'echo "$*" >> "$LOG_FILE"\nif [[ " $* " == *" recipe=${FAIL_RECIPE:-none} "* ]]; then exit 7; fi\n',
    )
    _fake(tmp_path / "bin", "keye-merge", 'echo "keye-merge $*" >> "$LOG_FILE"\n')
    _fake(tmp_path / "bin", "keye-convert", 'echo "keye-convert $*" >> "$LOG_FILE"\n')
    env = _env(LAUNCH=str(launcher), LOG_FILE=str(log))
    env["PATH"] = f"{tmp_path / 'bin'}:{env['PATH']}"
    args = [LAUNCH / "curriculum.sh", "--out", tmp_path / "runs", "--nproc", "1", "--mix-b", "seed=1"]

    result = _run(args, env={**env, "FAIL_RECIPE": "stage1_align"})
    assert result.returncode == 7 and "stage1 failed with exit status 7" in result.stderr
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and "recipe=stage1_align" in calls[1]  # stage 2 and later never ran

    log.unlink()
    result = _run(args, env=env)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert (
        len(calls) == 7 and calls[-2].startswith("keye-merge") and calls[-1].startswith("keye-convert export")
    )
