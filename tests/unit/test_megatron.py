"""Megatron indexed text built with megatron-core's own IndexedDatasetBuilder: both loaders read exactly
its documents, bad token ids are counted skips, and the indexed loader mixes, packs and resumes it."""

import numpy as np
import pytest
import torch
import yaml

from keye_train.data.loader.encode import SampleEncoder, SkipCounter, iter_source_samples
from keye_train.data.loader.planned import TopologyAwareLoader
from keye_train.data.shards.index import build_index, load_index, read_record
from keye_train.data.shards.manifest import load_manifest
from keye_train.data.synth.shards import build_tokenizer
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.distributed.parallel_dims import ParallelDims

megatron_ds = pytest.importorskip("megatron.core.datasets.indexed_dataset")


def build_megatron(prefix, docs, dtype=np.uint16):
    """Write docs (lists of sequences of ids) with megatron-core's builder, as preprocess_data does."""
    builder = megatron_ds.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for sequences in docs:
        flat = [t for s in sequences for t in s]
        builder.add_document(torch.tensor(flat, dtype=torch.int64), lengths=[len(s) for s in sequences])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("megatron")
    build_tokenizer(
        ["the quick brown fox jumps over the lazy dog " * 10], vocab_size=512, out_dir=root / "tok"
    )
    tok = load_tokenizer(root / "tok")
    rng = np.random.default_rng(0)
    docs = []
    for i in range(24):
        text = " ".join(rng.choice(["the", "quick", "brown", "fox", "jumps", "dog"], size=5 + 7 * (i % 5)))
        ids = tok.encode(text) + [tok.ids.endoftext]
        cut = len(ids) // 2
        docs.append([ids[:cut], ids[cut:]] if i % 3 == 0 else [ids])  # some documents of 2 sequences
    bad = {3: [[5, 600, 7]], 10: [[5, tok.ids.image_pad, 7]], 17: [[9]]}  # out of vocab, vision, 1 token
    for i, sequences in bad.items():
        docs[i] = sequences
    build_megatron(root / "corpus", docs)
    manifest = {
        "tokenizer": "tok",
        "sources": [{"name": "mega", "kind": "megatron", "shards": "corpus.bin", "weight": 1.0}],
    }
    (root / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return root, tok, docs, set(bad)


def reference(root, doc):
    ds = megatron_ds.IndexedDataset(str(root / "corpus"))
    start, end = ds.document_indices[doc], ds.document_indices[doc + 1]
    return np.concatenate(ds[int(start) : int(end)]).astype(np.int64)


def test_stream_reads_every_document_and_skips_bad_ids(data):
    root, tok, docs, bad = data
    source = load_manifest(root).sources[0]
    counter = SkipCounter(max_skip_rate=1.0)
    samples = list(iter_source_samples(source, encoder=SampleEncoder(tok), counter=counter))
    good = [i for i in range(len(docs)) if i not in bad]
    assert [s.key for s in samples] == [f"corpus-{i:09d}" for i in good]
    for s, i in zip(samples, good):
        assert torch.equal(s.input_ids, torch.from_numpy(reference(root, i)))
        assert torch.equal(s.labels[:-1], s.input_ids[1:]) and s.labels[-1] == -100
        assert torch.equal(s.position_ids, torch.arange(s.num_tokens).expand(3, -1))
    assert counter.skipped["mega"] == 3
    reasons = [r for _, r in counter.examples["mega"]]
    assert "outside the tokenizer vocabulary" in reasons[0] and "vision tokens" in reasons[1]
    assert "at least 2 tokens" in reasons[2]


def test_index_reads_documents_by_offset(data):
    root, tok, docs, bad = data
    source = load_manifest(root).sources[0]
    build_index(root / "corpus.bin", tokenizer=tok)
    entries = load_index(root / "corpus.bin", tokenizer=tok, kind="megatron")
    assert len(entries) == len(docs)
    assert {i for i, e in enumerate(entries) if e.error} == bad
    enc = SampleEncoder(tok)
    for i, entry in enumerate(entries):
        if i in bad:
            continue
        assert entry.text_tokens == sum(len(s) for s in docs[i])
        sample = enc.encode(read_record(root / "corpus.bin", entry, source=source))
        assert torch.equal(sample.input_ids, torch.from_numpy(reference(root, i)))


def _loader(root, tok):
    return TopologyAwareLoader(
        load_manifest(root),
        dims=ParallelDims(world_size=1),
        tokenizer=tok,
        max_seq_len=64,
        microbatches=2,
        prefetch=0,
    )


def test_indexed_loader_packs_plans_and_resumes_exactly(data):
    root, tok, docs, bad = data
    build_index(root / "corpus.bin", tokenizer=tok)

    def steps(loader, n):
        out = []
        for _ in range(n):
            step = loader.next_step()
            out.append((step.global_keys, [b.input_ids.clone() for b in step.microbatches]))
        return out

    full = steps(_loader(root, tok), 8)
    seen = {k for keys, _ in full for k in keys}
    assert seen == {f"corpus-{i:09d}" for i in range(len(docs)) if i not in bad}  # a whole epoch, bad skipped
    first = _loader(root, tok)
    head = steps(first, 3)
    state = first.state_dict()
    resumed = _loader(root, tok)
    resumed.load_state_dict(state)
    tail = steps(resumed, 5)
    for (ka, ia), (kb, ib) in zip(full, head + tail):
        assert ka == kb and all(torch.equal(x, y) for x, y in zip(ia, ib))
