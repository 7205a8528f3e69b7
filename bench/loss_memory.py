"""Peak host memory of the LM-head loss, plain (materialised [tokens x vocab] fp32 logits) vs chunked.

Forward + backward of head + cross entropy on `tokens` tokens of a hidden size of 64 and Qwen3's
151,936-token vocabulary, each (variant, tokens) in a fresh process so the peak RSS (ru_maxrss) is its
own. The runtime's own footprint (interpreter, torch, the inputs) is measured the same way and
subtracted: `loss_mib` is what the loss itself adds. The plain loss at 16K tokens needs ~30 GB (logits,
their log-softmax and gradient), more than a CPU test machine has: run it with --plain-tokens 16384
where memory allows; otherwise the JSON gives the plain loss measured at smaller sizes and the linear
fit through them (marked `extrapolated`). Usage:
    python bench/loss_memory.py [--tokens 16384] [--plain-tokens 2048 4096] [--chunk 1024]
        [--out bench/results/loss_memory.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource

import torch
import torch.nn.functional as F

from keye_train.models.lm_head import DEFAULT_CHUNK_TOKENS, chunked_linear_cross_entropy

VOCAB, HIDDEN = 151_936, 64


def _measure(variant: str, tokens: int, chunk: int, queue) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(tokens, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) * 0.02).requires_grad_()
    labels = torch.randint(0, VOCAB, (tokens,))
    if variant == "baseline":
        loss = (hidden.sum() + weight.sum()) * 0  # inputs and their gradients, no loss
    elif variant == "plain":
        loss = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
    else:
        loss, _ = chunked_linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    loss.backward()
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB on Linux -> MiB


def peak_mib(variant: str, tokens: int, chunk: int) -> float:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(variant, tokens, chunk, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--plain-tokens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_TOKENS)
    parser.add_argument("--out", default="bench/results/loss_memory.json")
    args = parser.parse_args(argv)
    rows = []
    for variant, tokens in [("chunked", args.tokens), *[("plain", n) for n in args.plain_tokens]]:
        base = peak_mib("baseline", tokens, args.chunk)
        peak = peak_mib(variant, tokens, args.chunk)
        rows.append(
            dict(variant=variant, tokens=tokens, peak_rss_mib=peak, baseline_mib=base, loss_mib=peak - base)
        )
        print(rows[-1], flush=True)
    plain = [r for r in rows if r["variant"] == "plain"]
    result = {
        "vocab": VOCAB,
        "hidden": HIDDEN,
        "chunk_tokens": args.chunk,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "measured": rows,
        "fp32_logits_mib_at_tokens": args.tokens * VOCAB * 4 / 2**20,
    }
    if len(plain) >= 2 and all(r["tokens"] != args.tokens for r in plain):
        (t0, m0), (t1, m1) = [(r["tokens"], r["loss_mib"]) for r in plain[:2]]
        slope = (m1 - m0) / (t1 - t0)
        result["plain_at_tokens_extrapolated_mib"] = m1 + slope * (args.tokens - t1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
