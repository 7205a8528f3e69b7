"""Decoding on remote I/O servers: the trainer-side config and the single entry point `decode_many`.

Video decoding and image preprocessing can dominate a step on the trainer's CPUs, so `keye-ioserver`
processes (on this or other hosts) decode for it: the loader plans which samples it needs (index entries
from the shard index, or raw member bytes when the server has no shared filesystem), `decode_many` sends
them to the servers, and gets back the same EncodedSamples (or structured Skips) local decoding gives,
in request order. With `data.ioserver.addresses` empty the same call decodes locally.

Why ZeroMQ (pyzmq) and not gRPC: the messages are a JSON header plus raw byte buffers, which ZeroMQ
sends as multipart frames without copying, while gRPC would need a .proto schema, generated code and a
protobuf toolchain in every image, and would copy tensors into protobuf bytes fields. ROUTER/DEALER
sockets give exactly the pattern needed: many asynchronous requests in flight per connection, replies
routed back to the requesting client by identity, a broker that load-balances over worker processes, and
automatic reconnection when a server restarts. Timeouts, retries and health checks are a few lines on top.

Layout: `ioserver_protocol` (wire format, the shared `decode_request`), `ioserver_server` (broker and
worker processes, `keye-ioserver`), `ioserver_client` (`IOClient`), `ioserver_local` (a server
subprocess for tests and benchmarks), this module (config, `decode_many`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from keye_train.data.batch import EncodedSample
from keye_train.data.ioserver.client import IOClient
from keye_train.data.ioserver.protocol import DecodeRequest, Skip, decode_request

__all__ = ["DecodeRequest", "IOClient", "IOServerConfig", "Skip", "decode_many", "decode_request"]


@dataclass
class IOServerConfig:
    """`data.ioserver`: where the I/O servers are and how the trainer talks to them."""

    addresses: list[str] = field(default_factory=list)  # tcp://HOST:PORT of each keye-ioserver; []: local
    timeout_s: float = 60.0  # per attempt, from sending to the reply (includes queueing on the server)
    retries: int = 2  # further attempts (on other servers first) before decoding locally
    max_in_flight: int = 16  # outstanding requests of one trainer process, all servers together
    ship_bytes: bool = False  # read samples here and send their bytes (servers without the shard files)
    probe_timeout_s: float = 5.0  # how long the first health check waits for the servers
    retry_down_s: float = 10.0  # a server that failed is pinged again after this
    # A server holding requests that answers no ping for this long (stopped, wedged) is given up on and its
    # requests re-sent at once, without waiting for timeout_s.
    hung_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        self.addresses = list(self.addresses)
        for i, address in enumerate(self.addresses):
            if not isinstance(address, str) or not address.startswith(("tcp://", "ipc://")):
                raise ValueError(
                    f"data.ioserver.addresses[{i}]={address!r} must be tcp://HOST:PORT or ipc://"
                )
        if len(set(self.addresses)) != len(self.addresses):
            raise ValueError(f"data.ioserver.addresses={self.addresses} lists a server twice")
        for key in ("timeout_s", "probe_timeout_s", "retry_down_s", "hung_timeout_s"):
            if not getattr(self, key) > 0:
                raise ValueError(f"data.ioserver.{key}={getattr(self, key)} must be > 0")
        if self.retries < 0:
            raise ValueError(f"data.ioserver.retries={self.retries} must be >= 0")
        if self.max_in_flight < 1:
            raise ValueError(f"data.ioserver.max_in_flight={self.max_in_flight} must be >= 1")


def decode_many(
    requests: Iterable[DecodeRequest],
    *,
    config: IOServerConfig,
    encoder: Any,
    client: IOClient | None = None,
) -> Iterator[EncodedSample | Skip]:
    """One EncodedSample or Skip per request, in request order, on the I/O servers of `config` (locally
    when it has no addresses). `encoder` is the trainer's SampleEncoder, used for local decoding and to
    check that the servers decode with the same settings. Pass a long-lived `client`
    (IOClient.from_config) to keep connections across calls; skips are the caller's to count
    (SkipCounter.skip(s.source, s.key, s.reason)).
    """
    if client is not None:
        yield from client.decode(requests)
        return
    if not config.addresses:
        for req in requests:
            yield decode_request(req, encoder=encoder)
        return
    with IOClient.from_config(config, encoder=encoder) as own:
        yield from own.decode(requests)
