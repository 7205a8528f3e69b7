"""`make demo`'s curriculum end to end: stage hand-offs, the RoPE reset, merge and export, losses falling."""

import json

import pytest
import torch
import yaml

from keye_train.checkpoint.dcp import (
    model_tensor_specs,
    read_model_tensors,
    resolve_checkpoint,
    saved_keye_config,
)
from keye_train.checkpoint.hf import load_into_model, load_keye_config
from keye_train.cli.demo import main as demo_main
from keye_train.models.keye import build_model
from keye_train.testing.toy_batch import toy_packed_batch

pytestmark = [pytest.mark.slow, pytest.mark.dist]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    demo_main(["--out", str(out), "--steps", "10", "--samples", "60", "--seq", "512"])
    return out


def final(run_dir):
    return resolve_checkpoint(run_dir)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2", "stage3_a", "stage3_b"])
def test_losses_decrease_within_each_stage(demo, stage):
    values = losses(demo / stage)
    assert len(values) == 10
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, values


def test_stage1_trains_only_the_projector(demo):
    before, after = final(demo / "stage0"), final(demo / "stage1")
    keys = [k for k in model_tensor_specs(after) if not k.startswith(("text_model.", "logit_"))]
    a, b = read_model_tensors(before, keys), read_model_tensors(after, keys)
    changed = {k for k in keys if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("mlp_AR.") for k in changed), sorted(changed)[:5]


def test_stage3_runs_with_the_reset_rope_base_and_its_length(demo):
    assert saved_keye_config(final(demo / "stage2")).language.rope_theta == 1e6
    for run in ("stage3_a", "stage3_b"):
        assert saved_keye_config(final(demo / run)).language.rope_theta == 8e6
        resolved = yaml.safe_load((demo / run / "config.yaml").read_text())
        assert resolved["stage"]["rope_theta"] == 8e6 and resolved["stage"]["max_seq_len"] == 512


def test_merge_is_the_average_and_export_keeps_the_logits(demo):
    a, b, merged = final(demo / "stage3_a"), final(demo / "stage3_b"), resolve_checkpoint(demo / "merged")
    keys = ["mlp_AR.linear_1.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"]
    ta, tb, tm = (read_model_tensors(p, keys) for p in (a, b, merged))
    for k in keys:
        torch.testing.assert_close(tm[k], (ta[k].double() * 0.5 + tb[k].double() * 0.5).float())

    cfg = saved_keye_config(merged)
    ours = build_model(cfg, device="meta")
    specs = model_tensor_specs(merged)
    names = [n for n in specs if not n.startswith(("text_model.", "logit_"))]
    ours.load_state_dict(read_model_tensors(merged, names), assign=True)
    exported = build_model(load_keye_config(demo / "hf"), device="meta")
    load_into_model(exported, demo / "hf")
    batch = toy_packed_batch(cfg, seed=3)
    inputs = dict(
        position_ids=batch["position_ids"],
        cu_seqlens=batch["cu_seqlens"],
        pixel_values=batch["pixel_values"],
        grid_thw=batch["grid_thw"],
    )
    with torch.no_grad():
        reference = ours.to(torch.bfloat16).float()(batch["input_ids"], **inputs)  # export is bf16
        logits = exported.float()(batch["input_ids"], **inputs)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
