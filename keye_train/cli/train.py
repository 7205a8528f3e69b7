"""`keye-train recipe=NAME [overrides...]`: run one curriculum stage, single process or under torchrun."""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.distributed as dist

from keye_train.cli.failure import report_failure, run_reporting
from keye_train.cli.launcher_guard import watch_launcher
from keye_train.config.loader import available_recipes, compose_config, save_resolved, split_recipe_arg
from keye_train.distributed.parallel_dims import (
    ParallelDims,
    init_distributed,
    shutdown_distributed,
    world_size_from_env,
)
from keye_train.distributed.precision import configure_matmul
from keye_train.train.build import resolve_device
from keye_train.train.preflight import broadcast_preflight
from keye_train.train.summary import print_run_summary

USAGE = """usage: keye-train recipe=NAME [key=value ...]

Runs one stage of the curriculum. Any key of the recipe can be overridden, e.g.
  keye-train recipe=stage2_multitask run_dir=runs/s2 steps=100 parallel.tp=2 stage.init_from=runs/s1
Under torchrun every rank runs the same command (launch/torchrun.sh, launch/slurm.sbatch).
A failure prints one line (from the rank that failed) and leaves the traceback in RUN_DIR/logs/.
Recipes: {recipes}
"""


class ConfigError(ValueError):
    same_on_every_rank = True  # every rank parses the same command line: rank 0 reports it


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(recipes=", ".join(available_recipes())))
        return 0
    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
    try:
        recipe, overrides = split_recipe_arg(argv)
        resolved, cfg = compose_config(recipe, overrides)
    except ValueError as exc:
        report_failure(ConfigError(str(exc)), run_dir=None)
        return 2
    return run_reporting(lambda: _run(recipe, resolved, cfg), run_dir=lambda: cfg.run_dir)


def _run(recipe: str, resolved, cfg) -> int:
    watch_launcher()  # under torchrun: stop when the launcher dies
    device = resolve_device(cfg.parallel.device)
    world_size = world_size_from_env()
    if world_size > 1:
        init_distributed(device_type=device.type)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
    dims = ParallelDims.from_config(cfg.parallel, world_size=world_size, device_type=device.type)
    configure_matmul(device.type)
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(cfg.seed)
    from omegaconf import OmegaConf

    resolved_yaml = OmegaConf.to_yaml(resolved, resolve=True)
    # Writable dirs, what resume continues, stage match; records the run's identity in run_dir.
    broadcast_preflight(cfg, rank=rank, recipe=recipe, log=print)
    if rank == 0:
        save_resolved(resolved, os.path.join(cfg.run_dir, "config.yaml"))
        print(f"keye-train: {recipe} on {dims.describe()}, run_dir={cfg.run_dir}", flush=True)
    if cfg.stage.loss == "siglip":
        from keye_train.train.siglip_stage import SiglipTrainer as TrainerClass
    else:
        from keye_train.train.trainer import Trainer as TrainerClass
    trainer = TrainerClass(cfg, dims=dims, device=device, resolved_yaml=resolved_yaml)
    trainer.setup()
    trainer.run()
    if rank == 0:
        print_run_summary(trainer)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
