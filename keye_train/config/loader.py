"""Compose a recipe with command-line overrides through Hydra, validate it, and save the resolved config."""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from keye_train.config.schema import TrainConfig

SCHEMA_NAME = "train_schema"  # recipes list it first in their defaults so unknown keys fail


def recipes_dir() -> Path:
    """$KEYE_RECIPES, else the repository's recipes/ folder."""
    env = os.environ.get("KEYE_RECIPES")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "recipes"


def register_schema() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)


def split_recipe_arg(argv: list[str]) -> tuple[str, list[str]]:
    """`recipe=NAME` picks the recipe file; every other argument is a Hydra override."""
    recipes = [a for a in argv if a.startswith("recipe=")]
    if len(recipes) != 1:
        raise ValueError(
            "name exactly one recipe, e.g. `keye-train recipe=stage2_multitask run_dir=runs/s2`; "
            f"available: {', '.join(available_recipes())}"
        )
    return recipes[0].split("=", 1)[1], [a for a in argv if not a.startswith("recipe=")]


def available_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml") if p.stem not in ("base", "merge"))


def compose_config(recipe: str, overrides: list[str]) -> tuple[DictConfig, TrainConfig]:
    """(resolved DictConfig, validated TrainConfig). Errors name the offending key."""
    if recipe not in available_recipes():
        raise ValueError(f"recipe {recipe!r} not found in {recipes_dir()}; available: {available_recipes()}")
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            cfg = compose(config_name=recipe, overrides=overrides)
        OmegaConf.resolve(cfg)
        typed = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        message = str(exc).split("\n")[0]
        cause = exc.__cause__ if isinstance(exc.__cause__, OmegaConfBaseException) else exc
        key = getattr(cause, "full_key", None)
        if key and isinstance(cause, ValidationError):
            # A value of the wrong type: OmegaConf's first line names value and type, the key comes after.
            detail = str(cause).split("\n")[0]
            message = f"{key}: {detail} (the schema's {key} expects that type; fix the value)"
        if message.startswith("Could not override"):
            message += " It is not a key of the schema (keye_train/config/schema.py); check its spelling."
        raise ValueError(f"recipe {recipe!r}: {message}") from None
    return cfg, typed


def save_resolved(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
