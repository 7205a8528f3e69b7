"""Compose a recipe with command-line overrides through Hydra, validate it, and save the resolved config."""

from __future__ import annotations

import dataclasses
import os
import re
import typing
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
    raw: dict = {}
    try:
        with initialize_config_dir(config_dir=str(recipes_dir()), version_base=None):
            cfg = compose(config_name=recipe, overrides=overrides)
        raw = OmegaConf.to_container(cfg, resolve=False)
        OmegaConf.resolve(cfg)
        typed = OmegaConf.to_object(cfg)
    except (HydraException, OmegaConfBaseException) as exc:
        message = _bad_value_message(exc, overrides) or str(exc).split("\n")[0]
        if message.startswith("Could not override"):
            message += " It is not a key of the schema (keye_train/config/schema.py); check its spelling."
        raise ValueError(f"recipe {recipe!r}: {message}") from None
    except ValueError as exc:  # a component's own validation ("schedule.total_steps=-5 must be ...")
        raise ValueError(_as_typed(str(exc), raw)) from None
    return cfg, typed


def expected_type(full_key: str) -> str | None:
    """The schema's annotation of a dotted key (`parallel.tp` -> 'int'), or None when it has none."""
    cls: typing.Any = TrainConfig
    annotation: typing.Any = None
    for part in full_key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        annotation = hints[part]
        cls = annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _bad_value_message(exc: BaseException, overrides: list[str]) -> str | None:
    """'parallel.tp=two: expected int (Value 'two' ... could not be converted to Integer)' for an override
    value of the wrong type; Hydra's own first line ("Error merging override ...") names no reason."""
    cause: BaseException | None = exc
    while cause is not None and not (isinstance(cause, ValidationError) and getattr(cause, "full_key", None)):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return None
    key = str(cause.full_key)
    # The value that failed (a key given twice fails on its bad value, whichever comes first).
    given = getattr(cause, "value", None)
    if given is None:
        given = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), None)
    reason = str(getattr(cause, "msg", "") or cause).split("\n")[0]
    expected = expected_type(key)
    value = f"={given}" if given is not None else ""
    return f"{key}{value}: " + (f"expected {expected} ({reason})" if expected else reason)


_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def _as_typed(message: str, raw: dict) -> str:
    """A validation message naming `KEY=VALUE` where the recipe sets KEY to `${OTHER}` names OTHER, the key
    the user typed: `steps=-5 (as schedule.total_steps) must be ...`, not `schedule.total_steps=-5 ...`."""
    match = re.match(r"^([A-Za-z_][\w.]*)=", message)
    if match is None:
        return message
    key = source = match.group(1)
    value = _lookup(raw, key)
    for _ in range(8):  # follow a chain of interpolations to the key that holds the value
        link = _INTERPOLATION.match(value) if isinstance(value, str) else None
        if link is None:
            break
        source = link.group(1)
        value = _lookup(raw, source)
    prefix = f"{key}={value}"
    if source == key or not message.startswith(prefix):
        return message
    return f"{source}={value} (as {key}){message[len(prefix) :]}"


def _lookup(raw: dict, dotted: str) -> object:
    node: object = raw
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def save_resolved(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(cfg, resolve=True))
