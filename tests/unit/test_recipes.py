"""Every recipe composes, validates and builds the tiny model; a mistyped key fails with its name."""

import dataclasses

import pytest

from keye_train.config.loader import available_recipes, compose_config
from keye_train.distributed.parallel_dims import ParallelDims
from keye_train.models.keye import build_model

RECIPES = ["stage0_vit", "stage1_align", "stage2_multitask", "stage3_anneal_128k"]
OVERRIDES = ["run_dir=/tmp/unused", "data.manifest=/tmp/unused.yaml"]


def test_all_recipes_are_listed():
    assert available_recipes() == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_validates_and_builds(recipe):
    resolved, cfg = compose_config(recipe, OVERRIDES)
    assert resolved.checkpoint.dir == "/tmp/unused/checkpoints"  # interpolations resolved
    assert cfg.schedule.total_steps == cfg.steps
    p = cfg.parallel
    dims = ParallelDims(
        world_size=8, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, cp=p.cp, tp=p.tp
    )
    model_cfg = cfg.model.build(
        vocab_size=512,
        token_ids={
            "image_token_id": 510,
            "video_token_id": 511,
            "vision_start_token_id": 508,
            "vision_end_token_id": 509,
            "pad_token_id": 0,
        },
    )
    lm = model_cfg.language
    dims.validate_for_model(num_layers=lm.num_layers, num_heads=lm.num_heads, num_kv_heads=lm.num_kv_heads)
    model = build_model(model_cfg, seed=0)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_stage_recipes_follow_the_paper():
    stages = {r: compose_config(r, OVERRIDES)[1] for r in RECIPES}
    assert stages["stage0_vit"].stage.loss == "siglip"
    assert stages["stage1_align"].stage.train == ["projector"]
    assert stages["stage2_multitask"].parallel.fsdp.zero_stage == 2
    s3 = stages["stage3_anneal_128k"]
    assert (s3.stage.rope_theta, s3.stage.max_seq_len, s3.parallel.fsdp.zero_stage) == (8e6, 131072, 1)
    assert s3.parallel.cp > 1 and s3.parallel.pp > 1
    shares = s3.data.shares
    assert shares["video"] == 0.24 and shares["text"] == 0.26
    assert sum(shares.values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("override", "name"),
    [("parallel.tpp=2", "parallel.tpp"), ("optim.lr.vitt=1", "optim.lr.vitt"), ("stepz=3", "stepz")],
)
def test_a_mistyped_key_fails_with_its_name(override, name):
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        compose_config("stage2_multitask", OVERRIDES + [override])


def test_an_invalid_value_fails_with_its_key():
    with pytest.raises(ValueError, match="stage.name"):
        compose_config("stage2_multitask", OVERRIDES + ["stage.name=stage9"])
    with pytest.raises(ValueError, match=r"parallel\.fsdp\.zero_stage=4"):
        compose_config("stage2_multitask", OVERRIDES + ["parallel.fsdp.zero_stage=4"])
    with pytest.raises(ValueError, match=r"precision='fp16'"):
        compose_config("stage2_multitask", OVERRIDES + ["precision=fp16"])


@pytest.mark.parametrize(
    ("override", "key", "value", "expected"),
    [
        ("parallel.tp=two", "parallel.tp", "two", "int"),
        ("parallel.compile=maybe", "parallel.compile", "maybe", "bool"),
        ("loss.chunk_tokens=1.5", "loss.chunk_tokens", "1.5", "int"),
    ],
)
def test_a_badly_typed_value_names_key_value_and_type(override, key, value, expected):
    with pytest.raises(ValueError) as info:
        compose_config("stage2_multitask", OVERRIDES + [override])
    message = str(info.value)
    assert key in message and value in message and expected in message.lower(), message


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["steps=6", "steps=abc"], "steps=abc: expected int"),  # given twice: the value that failed
        (["steps=abc", "steps=6"], "steps=abc: expected int"),
        (["steps=-5"], "steps=-5 (as schedule.total_steps) must be"),  # interpolated into another key
        (["steps=6", "steps=-5"], "steps=-5 (as schedule.total_steps) must be"),
        (["schedule.total_steps=-3"], "schedule.total_steps=-3 must be"),
    ],
)
def test_a_bad_value_is_reported_as_the_user_typed_it(overrides, named):
    with pytest.raises(ValueError) as info:
        compose_config("stage2_multitask", OVERRIDES + overrides)
    assert named in str(info.value)


def test_model_overrides_reach_the_model_config():
    _, cfg = compose_config("stage2_multitask", OVERRIDES + ["model.attn_backend=flex"])
    built = cfg.model.build(vocab_size=600, token_ids={})
    assert built.language.attn_backend == built.vision.attn_backend == "flex"
    assert built.language.vocab_size == 600
    assert dataclasses.asdict(built)["text_tower"]["vocab_size"] == 600
