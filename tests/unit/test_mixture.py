"""Mixture: realised token shares within 1% of the targets over 10k samples, deterministic per seed."""

import itertools
import random
from dataclasses import dataclass

import pytest

from keye_train.data.plan.mixture import Mixture


@dataclass
class Fake:
    key: str
    num_tokens: int


def stream(name: str, lo: int, hi: int, seed: int):
    rng = random.Random(seed)
    for i in itertools.count():
        yield Fake(f"{name}{i}", rng.randint(lo, hi))


def streams():
    # very different lengths: a sample-share mixer would badly miss token shares
    return {
        "video": stream("video", 800, 3000, 1),
        "image": stream("image", 100, 900, 2),
        "text": stream("text", 20, 400, 3),
    }


TARGET = {"video": 24, "image": 50, "text": 26}


def test_token_shares_within_one_percent():
    mix = Mixture(streams(), TARGET, seed=7)
    samples = list(itertools.islice(iter(mix), 10_000))
    tokens = {n: sum(s.num_tokens for s in samples if s.key.startswith(n)) for n in TARGET}
    total = sum(tokens.values())
    for name, share in TARGET.items():
        assert abs(tokens[name] / total - share / 100) < 0.01, (name, tokens[name] / total)
    report = mix.report()
    assert report["video"]["target"] == pytest.approx(0.24)
    assert report["text"]["realised"] == pytest.approx(tokens["text"] / total)


def test_deterministic_for_a_seed():
    keys = lambda seed: [s.key for s in itertools.islice(iter(Mixture(streams(), TARGET, seed=seed)), 2000)]
    assert keys(3) == keys(3)
    assert keys(3) != keys(4)


def test_sample_shares_and_exhaustion():
    mix = Mixture(streams(), {"video": 1, "image": 1, "text": 2}, seed=0, by_tokens=False)
    samples = list(itertools.islice(iter(mix), 10_000))
    counts = {n: sum(s.key.startswith(n) for s in samples) for n in TARGET}
    assert abs(counts["text"] / 10_000 - 0.5) < 0.01 and abs(counts["video"] / 10_000 - 0.25) < 0.01
    short = {"a": iter([Fake("a0", 5), Fake("a1", 5)]), "b": stream("b", 5, 5, 0)}
    dropped = list(itertools.islice(iter(Mixture(short, {"a": 1, "b": 1}, on_exhausted="drop")), 50))
    assert len(dropped) == 50 and sum(s.key.startswith("a") for s in dropped) == 2
    stopped = list(Mixture({"a": iter([Fake("a0", 5)]), "b": stream("b", 5, 5, 0)}, {"a": 1, "b": 1}))
    assert len(stopped) < 10


def test_invalid_shares():
    with pytest.raises(ValueError, match="differ"):
        Mixture(streams(), {"video": 1})
    with pytest.raises(ValueError, match="positive"):
        Mixture(streams(), {"video": 1, "image": 0, "text": 1})
