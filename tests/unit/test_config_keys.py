"""Every config key an error message names exists in the schema (a renamed key cannot leave stale
messages behind), and the `parallel:` section reaches ParallelDims."""

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from keye_train.config.schema import TrainConfig
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.distributed.parallelize import ParallelConfig

SOURCE = Path(__file__).resolve().parents[2] / "keye_train"
ROOTS = {f.name for f in dataclasses.fields(TrainConfig)}
# `name.sub=` right after a quote, brace, space or backtick: how messages cite a recipe key.
KEY = re.compile(r"""(?:(?<=["'`( ])|(?<=\{))([a-z_]+(?:\.[a-z_]+)+)=""")


def _resolves(path: str) -> bool:
    cls: typing.Any = TrainConfig
    for part in path.split("."):
        if typing.get_origin(cls) is dict or cls is dict:
            return True  # free-form keys below (optim.lr.vit, data.shares.video)
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if typing.get_origin(cls) in (typing.Union, __import__("types").UnionType) and args:
            cls = args[0]
    return True


def _cited_keys() -> dict[str, list[str]]:
    cited: dict[str, list[str]] = {}
    for path in SOURCE.rglob("*.py"):
        for match in KEY.finditer(path.read_text()):
            key = match.group(1)
            if key.split(".")[0] in ROOTS:
                cited.setdefault(key, []).append(str(path.relative_to(SOURCE.parent)))
    return cited


def test_every_key_named_in_an_error_exists_in_the_schema():
    cited = _cited_keys()
    assert "parallel.fsdp.zero_stage" in cited and "parallel.pipeline.microbatches" in cited  # it scans
    missing = {k: v for k, v in cited.items() if not _resolves(k)}
    assert not missing, f"messages name keys the schema does not have: {missing}"


def test_the_scan_catches_a_stale_key():
    assert not _resolves("parallelize.zero_stage") and not _resolves("parallel.fsdp.mixed_precision")
    assert _resolves("optim.lr.vit") and _resolves("parallel.fsdp.visual_replicas")


def test_parallel_dims_from_config():
    dims = ParallelDims.from_config(ParallelConfig(tp=2, pp=2), world_size=8)
    assert (dims.pp, dims.tp, dims.dp_shard) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"parallel\.tp=3 does not divide"):
        ParallelDims.from_config(ParallelConfig(tp=3), world_size=3).validate_for_model(
            num_layers=2, num_heads=4, num_kv_heads=2
        )
