"""`keye-ioserver`: a standalone decode/preprocess server for trainers (see data/ioserver/config.py).

Example:
    keye-ioserver --bind tcp://0.0.0.0:5555 --workers 8 --tokenizer /data/tokenizer \\
        --image max_tokens=16384 --video fps=2.0 --video video_max_tokens=65536

The image/video/chat settings must be the trainer's own (data.image / data.video of the recipe): clients
compare an encoder fingerprint and refuse a server that would decode differently.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import yaml


def _key_values(items: Sequence[str], flag: str) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r} is not KEY=VALUE")
        # YAML typing, as on a Hydra command line: 2.0 -> float, null -> None, [0.5,0.5,0.5] -> list.
        parsed = yaml.safe_load(value)
        out[key.strip()] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keye-ioserver", description=__doc__.splitlines()[0])
    p.add_argument("--bind", required=True, help="tcp://HOST:PORT (port 0: any free port) or ipc://PATH")
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (the trainer's data.tokenizer)")
    p.add_argument("--image", action="append", default=[], metavar="KEY=VALUE", help="ImageConfig field")
    p.add_argument("--video", action="append", default=[], metavar="KEY=VALUE", help="VideoConfig field")
    p.add_argument("--chat", action="append", default=[], metavar="KEY=VALUE", help="ChatOptions field")
    p.add_argument("--high-water", type=int, default=64, help="requests held at once; more are refused")
    p.add_argument("--max-client-inflight", type=int, default=32, help="requests held for one client")
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per worker")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    from keye_train.data.ioserver.server import ServerConfig, serve

    try:
        cfg = ServerConfig(
            bind=args.bind,
            tokenizer=args.tokenizer,
            workers=args.workers,
            image=_key_values(args.image, "--image"),
            video=_key_values(args.video, "--video"),
            chat=_key_values(args.chat, "--chat"),
            high_water=args.high_water,
            max_client_inflight=args.max_client_inflight,
            torch_threads=args.torch_threads,
        )
        # The announcement goes to stdout (one JSON line, flushed) so a launcher can read the bound port.
        serve(cfg, announce=lambda line: print(line, flush=True))
    except (ValueError, RuntimeError) as exc:
        print(f"keye-ioserver: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
