"""A Qwen-style tokenizer directory (byte-level BPE, Qwen special tokens at their real ids): the Keye-1.5
tokens are added when absent, ids come from the tokenizer, the prompt layout is KEYE_SPEC's, and a model
initialised from a smaller vocabulary grows its embedding and lm_head."""

from __future__ import annotations

import dataclasses
import json

import jinja2
import pytest
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from keye_train.checkpoint.hf_bundle import chat_template
from keye_train.checkpoint.manager import CheckpointConfig, CheckpointManager, TrainState
from keye_train.config.loader import compose_config
from keye_train.data.batch import FrameSpec
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text import chat
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.models.configs import tiny
from keye_train.models.keye import build_model
from keye_train.train.build import build_weights, keye_config, tokenizer_token_ids

# The Qwen2/Qwen3 vocabulary: 151643 BPE tokens, then these special tokens in id order (KEYE_SPEC ids).
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]  # fmt: skip
BPE_SIZE = 151643
QWEN_IDS = {token: BPE_SIZE + i for i, token in enumerate(QWEN_SPECIALS)}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """tokenizer.json + tokenizer_config.json shaped like Qwen3's (GPT-2 byte-level BPE, no prefix space)."""
    root = tmp_path_factory.mktemp("qwen3_tok")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("1", "2")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    while (
        len(vocab) < BPE_SIZE
    ):  # filler merges up to the real vocabulary size, so the specials sit at 151643+
        vocab[f"<filler_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    tok.save(str(root / "tokenizer.json"))
    decoder = {str(i): {"content": t, "special": True} for t, i in QWEN_IDS.items()}
    config = {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "added_tokens_decoder": decoder}  # fmt: skip
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def test_qwen_specials_keep_their_ids_and_the_keye_tokens_are_added(qwen_dir):
    loaded = load_tokenizer(qwen_dir)
    backend = loaded.tokenizer
    for token, token_id in QWEN_IDS.items():
        assert backend.token_to_id(token) == token_id, token
    # Added after </think> (151668) in KEYE_SPEC's order: the grounding pairs land on the spec's ids.
    names = ("point_start", "point_end", "ocr_text_start", "ocr_text_end", "clip_time_start", "clip_time_end")
    spec = {f"<|{name}|>": 151669 + i for i, name in enumerate(names)}
    assert {t: backend.token_to_id(t) for t in spec} == spec
    new = ["<|frame|>", "<|fast_start|>", "<|fast_end|>"]
    assert set(new) <= set(loaded.added_tokens)
    ids = loaded.ids
    assert (ids.frame, ids.fast_start, ids.fast_end) == tuple(backend.token_to_id(t) for t in new)
    assert len({ids.frame, ids.fast_start, ids.fast_end} | set(QWEN_IDS.values())) == len(QWEN_IDS) + 3
    assert (ids.image_pad, ids.video_pad, ids.vision_start) == (151655, 151656, 151652)
    with pytest.raises(ValueError, match="lacks special tokens"):
        load_tokenizer(qwen_dir, add_missing=False)


def test_prompt_layout_for_an_image_and_a_video(qwen_dir):
    loaded = load_tokenizer(qwen_dir)
    ids = loaded.ids
    frames = (
        FrameSpec(index=0, timestamp=0.0, is_fast=False, grid_hw=(4, 4)),
        FrameSpec(index=25, timestamp=12.5, is_fast=True, grid_hw=(2, 4)),
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "the"}]},
        {"role": "assistant", "content": "12"},
    ]
    segments = chat.render_conversation(
        messages,
        images=[chat.ImageInfo(grid_hw=(4, 6), size=(84, 56))],
        videos=[chat.VideoInfo(frames=frames)],
        options=chat.ChatOptions(think_mode="no_think"),
    )
    got, _ = chat.encode_segments(segments, encode_batch=loaded.encode_batch)
    text = loaded.encode
    im_start, im_end = QWEN_IDS["<|im_start|>"], QWEN_IDS["<|im_end|>"]
    expected = (
        [im_start, *text("system\nYou are a helpful assistant."), im_end, *text("\n")]
        + [im_start, *text("user\n")]
        + [151652, *[151655] * 6, 151653]  # image: 4x6 patches -> 6 pads
        + [151652, ids.frame, *text("0.0"), *[151656] * 4]  # slow frame 4x4 -> 4 pads
        + [ids.frame, *text("12.5"), ids.fast_start, *[151656] * 2, ids.fast_end, 151653]  # fast 2x4 -> 2
        + [*text("the/no_think"), im_end, *text("\n")]
        + [im_start, *text("assistant\n"), *text("12"), im_end, *text("\n")]
    )
    assert got.tolist() == expected
    assert loaded.decode(expected) == chat.segments_to_text(segments)


@pytest.mark.parametrize("mode", [None, "think", "no_think"])
def test_exported_chat_template_renders_our_chat_layout(mode):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    template = jinja2.Environment().from_string(chat_template())
    rendered = template.render(messages=messages, think_mode=mode, add_generation_prompt=False)
    ours = chat.segments_to_text(
        chat.render_conversation(messages, options=chat.ChatOptions(think_mode=mode))
    )
    assert rendered == ours
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    rendered = template.render(messages=with_system, think_mode=mode)
    assert rendered == chat.segments_to_text(
        chat.render_conversation(with_system, options=chat.ChatOptions(think_mode=mode))
    )


def test_a_tokenizer_with_more_tokens_grows_the_embedding_and_lm_head(tmp_path):
    build_tokenizer(["words for a small tokenizer"] * 10, vocab_size=512, out_dir=tmp_path / "tok")
    small = load_tokenizer(tmp_path / "tok")
    cfg = dataclasses.replace(tiny(), **tokenizer_token_ids(small))
    source = build_model(cfg, seed=2)
    state = TrainState(model=source, optimizer=torch.optim.SGD(source.parameters(), lr=0.1), keye_cfg=cfg)
    CheckpointManager(CheckpointConfig(dir=str(tmp_path / "run" / "checkpoints"))).save(1, state)
    bigger = Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json"))
    bigger.add_special_tokens([AddedToken(f"<|extra_{i}|>", special=True) for i in range(3)])
    (tmp_path / "tok2").mkdir()
    bigger.save(str(tmp_path / "tok2" / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path / "tok2")
    assert tokenizer.vocab_size == 515 and tokenizer.ids == small.ids
    overrides = [
        "run_dir=/tmp/unused",
        "data.manifest=/tmp/unused.yaml",
        f"stage.init_from={tmp_path / 'run'}",
    ]
    _, train = compose_config("stage2_multitask", overrides)
    built = keye_config(train, tokenizer)
    assert built.language.vocab_size == 515
    model, _ = build_weights(train, built, device=torch.device("cpu"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        grown, original = model.state_dict()[name], source.state_dict()[name]
        assert grown.shape == (515, original.shape[1])
        assert torch.equal(grown[:512], original)
        torch.testing.assert_close(grown[512:], original.mean(0).expand(3, -1), atol=0, rtol=0)
    assert model.cfg.language.vocab_size == 515
