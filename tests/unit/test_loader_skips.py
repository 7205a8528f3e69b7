"""Bad samples in the planned loader: an image over the aspect-ratio limit is skipped at planning time,
the skip counts are part of the loader state, and the skip-rate ceiling holds across resumes."""

import io
import tarfile
from dataclasses import replace

import pytest
import torch
from PIL import Image

from keye_train.data.loader.pixels import from_wire, to_wire
from keye_train.data.loader.planned import TopologyAwareLoader
from keye_train.data.media.image import ImageConfig, preprocess_image
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.shards.prepare import ensure_indexes
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.distributed.parallel_dims import ParallelDims

# 1 in 3 captions has a 1 x 300 image: aspect ratio 300 > 200, which the resize rule refuses.
SAMPLES = 18
BAD = {f"pair{i:03d}" for i in range(SAMPLES) if i % 3 == 1}


def _png(width: int, height: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("skips")
    base = synth_dataset(SynthConfig(out=root / "synth", samples=5, seed=2))  # for its tokenizer
    shard = root / "pairs-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(SAMPLES):
            key = f"pair{i:03d}"
            size = (300, 1) if key in BAD else (56, 56)
            for name, data in ((f"{key}.png", _png(*size, i)), (f"{key}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    manifest = root / "manifest.yaml"
    manifest.write_text(
        f"tokenizer: {base['tokenizer']}\nseed: 0\nmax_skip_rate: 0.2\nmin_samples_for_skip_rate: 40\n"
        f"sources:\n- name: pairs\n  kind: caption\n  shards: {shard}\n  weight: 1\n"
    )
    tok = load_tokenizer(base["tokenizer"])
    ensure_indexes([load_manifest(manifest)], tokenizer=tok, builds=True, progress=False)
    return manifest, tok


def _loader(dataset, **overrides):
    manifest, tok = dataset
    data_cfg = replace(load_manifest(manifest), **overrides)
    return TopologyAwareLoader(
        data_cfg, dims=ParallelDims(world_size=1), tokenizer=tok, max_seq_len=64, microbatches=1, prefetch=0
    )


def _run(loader, steps):
    keys = []
    for _ in range(steps):
        keys.append(loader.next_step().global_keys)
    return keys


def test_aspect_ratio_over_200_is_skipped_at_planning_with_its_reason(dataset):
    loader = _loader(dataset, max_skip_rate=1.0)  # set-up must not raise on the bad images
    consumed = [k for step in _run(loader, 3) for k in step]
    assert consumed and not set(consumed) & BAD
    counts = loader.counter
    assert counts.skipped["pairs"] > 0
    reasons = loader.skips.local.reasons["pairs"]
    assert list(reasons) == ["index"], reasons
    assert all("aspect ratio" in why for _, why in loader.skips.local.examples["pairs"])
    assert loader.state_dict()["skips"]["pairs"][1] == counts.skipped["pairs"]


def test_skip_ceiling_holds_across_a_resume(dataset):
    # 1 in 3 skipped (33%) against a 20% ceiling once 9 samples were seen: the uninterrupted run stops.
    uninterrupted = _loader(dataset)
    steps = 0
    with pytest.raises(RuntimeError) as stopped:
        while steps < 50:
            uninterrupted.next_step()
            steps += 1
    assert "\n" not in str(stopped.value) and "max_skip_rate" in str(stopped.value)
    assert steps >= 1, "the ceiling must trip after a first step, so that a resume can precede it"
    # The same run saved after its first step and resumed in a new loader stops at the same step:
    # the count before the checkpoint is not forgotten.
    first = _loader(dataset)
    first.next_step()
    saved = first.state_dict()
    resumed = _loader(dataset)
    resumed.load_state_dict(saved)
    more = 1
    with pytest.raises(RuntimeError):
        while more < 50:
            resumed.next_step()
            more += 1
    assert more == steps


def test_pixels_travel_as_uint8_exactly_when_they_come_from_uint8():
    cfg = ImageConfig()
    image = Image.fromarray(torch.randint(0, 256, (56, 84, 3), dtype=torch.uint8).numpy())
    pixels, _ = preprocess_image(image, cfg)
    wire = to_wire(pixels, mean=cfg.mean, std=cfg.std)
    assert wire.dtype == torch.uint8
    assert torch.equal(from_wire(wire, mean=cfg.mean, std=cfg.std), pixels)
    noisy = pixels + 1e-3  # not the normalisation of any uint8 value: sent as it is
    assert to_wire(noisy, mean=cfg.mean, std=cfg.std).dtype == torch.float32
