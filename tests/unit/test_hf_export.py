"""`keye-convert export` gives a folder that transformers loads with trust_remote_code and that carries
every config field vLLM's Keye-VL-1.5 loader reads; logits and greedy tokens match keye_train's."""

from __future__ import annotations

import ast
import dataclasses
import json
import sys

import pytest
import torch

from keye_train.checkpoint.export import export_to_hf
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.data.batch import FrameSpec
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text import chat
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model, position_ids_for
from keye_train.train.build import tokenizer_token_ids

transformers = pytest.importorskip("transformers")

IMAGE_GRID = (4, 6)  # patches; 6 LLM tokens
FRAMES = (
    FrameSpec(index=0, timestamp=0.0, is_fast=False, grid_hw=(4, 4)),  # slow frame
    FrameSpec(index=5, timestamp=2.5, is_fast=True, grid_hw=(2, 2)),  # fast frame, smaller
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    corpus = ["a picture of a red square and a blue circle", "the video shows 12.5 seconds of motion"] * 20
    build_tokenizer(corpus, vocab_size=512, out_dir=root / "tok")
    tokenizer = load_tokenizer(root / "tok")
    cfg = dataclasses.replace(tiny(vocab_size=tokenizer.vocab_size), **tokenizer_token_ids(tokenizer))
    model = build_model(cfg, seed=0)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        for p in model.parameters():  # norms away from ones/zeros so that every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    state = TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), keye_cfg=cfg)
    CheckpointManager(CheckpointConfig(dir=str(root / "run"))).save(1, state)
    out = export_to_hf(
        root / "run", root / "hf", dtype="fp32", tokenizer_dir=root / "tok", log=lambda _: None
    )
    return {"out": out, "cfg": cfg, "model": model.eval(), "tokenizer": tokenizer}


def _sample(tokenizer, cfg):
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what moves"}],
        },
        {"role": "assistant", "content": "the circle"},
    ]
    segments = chat.render_conversation(
        messages,
        images=[chat.ImageInfo(grid_hw=IMAGE_GRID, size=(84, 56))],
        videos=[chat.VideoInfo(frames=FRAMES)],
    )
    ids, _ = chat.encode_segments(segments, encode_batch=tokenizer.encode_batch)
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(IMAGE_GRID[0] * IMAGE_GRID[1], 3, 14, 14, generator=generator)
    video = torch.randn(sum(h * w for f in FRAMES for h, w in [f.grid_hw]), 3, 14, 14, generator=generator)
    return ids, image, video


def _ours(model, cfg, ids, image, video):
    grids = [IMAGE_GRID] + [f.grid_hw for f in FRAMES]
    with torch.no_grad():
        return model(
            ids[None],
            position_ids=position_ids_for(ids, grids_hw=grids, cfg=cfg)[:, None],
            pixel_values=torch.cat([image, video]),
            grid_thw=torch.tensor([(1, h, w) for h, w in grids]),
        )[0]


@pytest.fixture(scope="module")
def hf_model(exported):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        exported["out"], trust_remote_code=True, dtype=torch.float32
    )
    yield model.eval()
    # The remote modules are cached under transformers_modules; drop them so other tests start clean.
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


def _hf_inputs(ids, image, video):
    return {
        "input_ids": ids[None],
        "pixel_values": image,
        "image_grid_thw": torch.tensor([(1, *IMAGE_GRID)]),
        "pixel_values_videos": video,
        "video_grid_thw": torch.tensor([(1, *f.grid_hw) for f in FRAMES]),
    }


def test_folder_is_complete(exported):
    out = exported["out"]
    for name in (
        "config.json",
        "configuration_keye_vl1_5.py",
        "modeling_keye_vl1_5.py",
        "processing_keye_vl1_5.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    cfg = exported["cfg"]
    assert config["architectures"] == ["KeyeVL1_5ForConditionalGeneration"]
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_keye_vl1_5.")
    assert config["max_position_embeddings"] == cfg.language.max_position_embeddings
    tok = exported["tokenizer"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.ids.endoftext, tok.ids.im_end)
    # The remote code stands alone: nothing in it imports keye_train.
    for name in ("configuration_keye_vl1_5.py", "modeling_keye_vl1_5.py", "processing_keye_vl1_5.py"):
        tree = ast.parse((out / name).read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not [m for m in modules if m.startswith("keye_train")], name


def test_transformers_logits_equal_ours_on_image_video_text(exported, hf_model):
    ids, image, video = _sample(exported["tokenizer"], exported["cfg"])
    assert exported["cfg"].video_token_id in ids.tolist() and exported["cfg"].image_token_id in ids.tolist()
    ours = _ours(exported["model"], exported["cfg"], ids, image, video)
    with torch.no_grad():
        theirs = hf_model(**_hf_inputs(ids, image, video)).logits[0]
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_matches_our_argmax(exported, hf_model, use_cache):
    ids, image, video = _sample(exported["tokenizer"], exported["cfg"])
    ends = [i for i, t in enumerate(ids.tolist()) if t == exported["tokenizer"].ids.im_end]
    prompt = ids[: ends[1] + 1]  # system and user turns
    lengths = []  # tokens the decoder runs per step: 1 after the prompt with the KV cache
    hook = hf_model.model.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[1]))
    with torch.no_grad():
        out = hf_model.generate(
            **_hf_inputs(prompt, image, video), max_new_tokens=4, do_sample=False, use_cache=use_cache
        )
    hook.remove()
    generated = out[0, len(prompt) :].tolist()
    assert 2 <= len(generated) <= 4  # (fixed seeds) the model does not stop at once: decode steps run
    assert len(lengths) == len(generated)  # one decoder pass per new token
    if use_cache:
        assert lengths == [len(prompt)] + [1] * (len(lengths) - 1)
    else:
        assert lengths == [len(prompt) + i for i in range(len(lengths))]
    expected, running = [], prompt
    eos = {exported["cfg"].eos_token_id, exported["cfg"].pad_token_id}
    for _ in range(len(generated)):  # our model's greedy continuation, one token at a time
        token = int(_ours(exported["model"], exported["cfg"], running, image, video)[-1].argmax())
        expected.append(token)
        running = torch.cat([running, torch.tensor([token])])
        if token in eos:
            break
    assert generated == expected


def test_left_padded_batch_gives_each_samples_own_logits(exported, hf_model):
    ids, image, video = _sample(exported["tokenizer"], exported["cfg"])
    text = torch.tensor(exported["tokenizer"].encode("a picture of a red square"))
    pad = exported["cfg"].pad_token_id
    width = len(ids)
    batch = torch.stack([ids, torch.cat([torch.full((width - len(text),), pad), text])])
    mask = torch.stack(
        [torch.ones(width, dtype=torch.long), (torch.arange(width) >= width - len(text)).long()]
    )
    inputs = _hf_inputs(ids, image, video) | {"input_ids": batch, "attention_mask": mask}
    with torch.no_grad():
        both = hf_model(**inputs).logits
        alone = hf_model(input_ids=text[None]).logits[0]
    torch.testing.assert_close(
        both[0], _ours(exported["model"], exported["cfg"], ids, image, video), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(both[1, width - len(text) :], alone, atol=1e-5, rtol=0)


def test_chat_template_and_processor_give_our_prompt_layout(exported):
    from PIL import Image

    out = exported["out"]
    processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "hi"}]}
    ]
    text = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (84, 56), (200, 10, 10))  # 84x56 px -> 6x4 patches, as IMAGE_GRID
    frames = [Image.new("RGB", (56, 56), (0, 0, 0)), Image.new("RGB", (28, 28), (255, 255, 255))]
    inputs = processor(
        text=text, images=[image], videos=[frames], timestamps=[[0.0, 2.5]], frame_types=[[0, 1]]
    )
    segments = chat.render_conversation(
        [*messages, {"role": "assistant", "content": "x"}],
        images=[chat.ImageInfo(grid_hw=IMAGE_GRID, size=(84, 56))],
        videos=[chat.VideoInfo(frames=FRAMES)],
    )
    ours = chat.segments_to_text(segments)
    ours = ours[: ours.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")]
    assert inputs["input_ids"][0].tolist() == exported["tokenizer"].encode(ours)
    assert inputs["image_grid_thw"].tolist() == [[1, *IMAGE_GRID]]
    assert inputs["video_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 2]]


def test_processor_pixels_equal_our_image_preprocessing(exported):
    import numpy as np
    from PIL import Image

    from keye_train.data.media.image import ImageConfig, preprocess_image

    processor = transformers.AutoProcessor.from_pretrained(exported["out"], trust_remote_code=True)
    noise = np.random.default_rng(0).integers(0, 256, size=(70, 101, 3), dtype=np.uint8)
    image = Image.fromarray(noise)  # 101x70 px: resized to 112x56, i.e. 8x4 patches
    inputs = processor(text="<|image_pad|>", images=[image])
    patches, grid = preprocess_image(image, ImageConfig())
    assert inputs["image_grid_thw"].tolist() == [[1, *grid]]
    assert torch.equal(inputs["pixel_values"], patches)


# Every config attribute vLLM's keye_vl1_5 / keye model files (and the Qwen3 decoder they build) read,
# listed from vllm/model_executor/models/keye.py, keye_vl1_5.py and qwen3.py.
VLLM_TOP_LEVEL = (
    "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias", "tie_word_embeddings", "image_token_id",
    "video_token_id", "vision_config", "bos_token_id", "eos_token_id", "torch_dtype",
)  # fmt: skip
VLLM_VISION = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
    "image_size", "patch_size", "hidden_act", "layer_norm_eps", "spatial_merge_size",
)  # fmt: skip
VLLM_PREPROCESSOR = ("merge_size", "min_pixels", "max_pixels", "patch_size", "image_mean", "image_std")
VLLM_PROCESSOR_ATTRIBUTES = ("image_token", "video_token", "frame_token", "fast_start", "fast_end")


def test_export_carries_every_field_vllm_reads(exported):
    out = exported["out"]
    config = json.loads((out / "config.json").read_text())
    assert [k for k in VLLM_TOP_LEVEL if config.get(k) is None] == []
    assert [k for k in VLLM_VISION if config["vision_config"].get(k) is None] == []
    assert "mrope_section" in config["rope_scaling"]  # how vLLM decides the model uses M-RoPE
    assert config["hidden_act"] == "silu" and config["vision_config"]["hidden_act"] == "gelu_pytorch_tanh"
    preprocessor = json.loads((out / "preprocessor_config.json").read_text())
    assert [k for k in VLLM_PREPROCESSOR if k not in preprocessor] == []
    assert preprocessor["merge_size"] == config["vision_config"]["spatial_merge_size"]
    vocab = json.loads((out / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    processing = (out / "processing_keye_vl1_5.py").read_text()
    for attribute in VLLM_PROCESSOR_ATTRIBUTES:
        assert f"    {attribute} = " in processing, attribute
    for token in ("<|image_pad|>", "<|video_pad|>", "<|frame|>", "<|fast_start|>", "<|fast_end|>"):
        assert token in added, token
    assert added["<|image_pad|>"] == config["image_token_id"]
    assert added["<|video_pad|>"] == config["video_token_id"]
