"""The I/O server: a ZeroMQ ROUTER broker in front of decoding worker processes, with a high-water mark.

Clients (DEALER sockets) send decode requests to the broker's ROUTER socket. The broker hands each request
to an idle worker process (load balancing: a worker gets a new request only after replying, so a slow
video never queues behind another on a busy worker), holds at most `high_water` requests (queued plus
decoding) and `max_client_inflight` per client, and answers anything beyond with `busy` instead of
buffering without limit. It answers `ping` itself (health, load, encoder fingerprint), even while every
worker is busy, and replaces a worker process that dies, answering its request with a retryable error.
"""

from __future__ import annotations

import collections
import json
import logging
import multiprocessing as mp
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from keye_train.data.ioserver import protocol as proto

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """One I/O server. image/video/chat are keyword arguments of ImageConfig/VideoConfig/ChatOptions and
    must match the trainer's (clients check the encoder fingerprint)."""

    bind: str
    tokenizer: str
    workers: int = 2
    image: dict = field(default_factory=dict)
    video: dict = field(default_factory=dict)
    chat: dict = field(default_factory=dict)
    high_water: int = 64  # requests held at once (queued + decoding), all clients together
    max_client_inflight: int = 32  # requests held at once for one client connection
    torch_threads: int = 1  # per worker: N workers x many intra-op threads would oversubscribe the cores
    ready_timeout_s: float = 180.0  # workers must load the tokenizer and report within this

    def __post_init__(self) -> None:
        if not self.bind.startswith(("tcp://", "ipc://")):
            raise ValueError(f"ioserver.bind={self.bind!r} must be tcp://HOST:PORT or ipc://PATH")
        for key in ("workers", "high_water", "max_client_inflight", "torch_threads"):
            if getattr(self, key) < 1:
                raise ValueError(f"ioserver.{key}={getattr(self, key)} must be >= 1")
        if not Path(self.tokenizer).is_dir():
            raise ValueError(f"ioserver.tokenizer={self.tokenizer!r} is not a directory")
        build_encoder(self, tokenizer_only=False, check_only=True)


def build_encoder(cfg: ServerConfig, *, tokenizer_only: bool = False, check_only: bool = False) -> Any:
    """The SampleEncoder the server's workers run (check_only: validate the configs, load nothing)."""
    from keye_train.data.loader.encode import SampleEncoder
    from keye_train.data.media.image import ImageConfig
    from keye_train.data.media.video import VideoConfig
    from keye_train.data.text.chat import ChatOptions
    from keye_train.data.text.tokenizer import load_tokenizer

    configs = {}
    for key, cls, kwargs in (("image", ImageConfig, cfg.image), ("video", VideoConfig, cfg.video)):
        try:
            configs[key] = cls(**kwargs)
        except TypeError as exc:
            raise ValueError(f"ioserver.{key}={kwargs}: {exc}") from None
    try:
        options = ChatOptions(**cfg.chat)
    except TypeError as exc:
        raise ValueError(f"ioserver.chat={cfg.chat}: {exc}") from None
    if check_only:
        return None
    tok = load_tokenizer(cfg.tokenizer)
    return SampleEncoder(tok, image_cfg=configs["image"], video_cfg=configs["video"], options=options)


def _worker_main(cfg: ServerConfig, backend: str, identity: bytes, parent_pid: int) -> None:
    """One decoding process: takes a request from the broker, replies, asks for the next."""
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the broker decides when workers stop
    torch.set_num_threads(cfg.torch_threads)
    encoder = build_encoder(cfg)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend)
    sock.send_multipart([b"READY", str(os.getpid()).encode()])
    try:
        while True:
            # A worker outliving its broker (killed with SIGKILL) would hold memory forever: leave when
            # the parent changes.
            if not sock.poll(1000):
                if os.getppid() != parent_pid:
                    return
                continue
            client, header_frame, *frames = sock.recv_multipart(copy=False)
            header: dict[str, Any] = {}
            try:
                header = proto.unpack_header(header_frame.bytes)
                req = proto.decode_request_frames(header, [f.buffer for f in frames])
                missing = proto.shard_missing(req)
                if missing:
                    reply = proto.encode_status(
                        seq=header["id"], attempt=header["attempt"], status="error", message=missing
                    )
                else:
                    result = proto.decode_request(req, encoder=encoder)
                    reply = proto.encode_result(result, seq=header["id"], attempt=header["attempt"])
            except Exception as exc:  # a malformed request or a failure outside decoding: retryable
                log.exception("worker %s: request failed", identity)
                reply = proto.encode_status(
                    seq=header.get("id"), attempt=header.get("attempt"), status="error", message=repr(exc)
                )
            sock.send_multipart([b"R", client.bytes, *reply], copy=False)
    finally:
        sock.close(0)
        ctx.term()


class Broker:
    """Routes requests from the frontend ROUTER to idle workers; see the module docstring."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.fingerprint = proto.encoder_fingerprint(build_encoder(cfg))
        self.ctx = zmq.Context()
        self.frontend = self.ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        bind = cfg.bind[:-2] + ":*" if cfg.bind.startswith("tcp://") and cfg.bind.endswith(":0") else cfg.bind
        self.frontend.bind(bind)
        self.address = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self._tmp = tempfile.TemporaryDirectory(prefix="keye-ioserver-")
        self.backend = self.ctx.socket(zmq.ROUTER)
        self.backend.setsockopt(zmq.LINGER, 0)
        backend_addr = f"ipc://{self._tmp.name}/workers"
        self.backend.bind(backend_addr)
        self.backend_addr = backend_addr
        self.procs: dict[bytes, mp.process.BaseProcess] = {}
        self.worker_pids: dict[bytes, int] = {}
        self.idle: collections.deque[bytes] = collections.deque()
        self.assigned: dict[bytes, tuple[bytes, Any, Any]] = {}  # worker -> (client, id, attempt)
        self.queue: collections.deque[tuple[bytes, dict, list]] = collections.deque()
        self.per_client: collections.Counter[bytes] = collections.Counter()
        self.stats = collections.Counter()
        self._generation = 0
        self._mp = mp.get_context("spawn")  # fork would copy the broker's ZeroMQ context and threads
        self.stopping = False
        for _ in range(cfg.workers):
            self._start_worker()

    @property
    def held(self) -> int:
        return len(self.queue) + len(self.assigned)

    def _start_worker(self) -> None:
        self._generation += 1
        identity = f"w{self._generation}".encode()
        proc = self._mp.Process(
            target=_worker_main,
            args=(self.cfg, self.backend_addr, identity, os.getpid()),
            name=f"keye-ioserver-{identity.decode()}",
            daemon=True,
        )
        proc.start()
        self.procs[identity] = proc

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while len(self.worker_pids) < self.cfg.workers:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(self.worker_pids)} of {self.cfg.workers} I/O workers started within "
                    f"{self.cfg.ready_timeout_s}s"
                )
            if self.backend.poll(200):
                self._on_backend(self.backend.recv_multipart(copy=False))
            self._check_workers()

    def _reply(self, client: bytes, frames: list) -> None:
        self.frontend.send_multipart([client, *frames], copy=False)

    def _status(self, client: bytes, seq: Any, attempt: Any, status: str, message: str) -> None:
        self._reply(client, proto.encode_status(seq=seq, attempt=attempt, status=status, message=message))

    def _on_frontend(self, msg: list) -> None:
        client, header_frame, *frames = msg
        try:
            header = proto.unpack_header(header_frame.bytes)
        except proto.ProtocolError as exc:
            self.stats["malformed"] += 1
            self._reply(
                client.bytes, proto.encode_status(seq=None, attempt=None, status="error", message=str(exc))
            )
            return
        if header.get("op") == "ping":
            self._reply(client.bytes, [proto.pack_header(self.health(header.get("id")))])
            return
        seq, attempt = header.get("id"), header.get("attempt")
        if header.get("op") != "decode":
            msg_ = f"unknown op {header.get('op')!r}"
            self._reply(
                client.bytes, proto.encode_status(seq=seq, attempt=attempt, status="error", message=msg_)
            )
            return
        if self.held >= self.cfg.high_water or self.per_client[client.bytes] >= self.cfg.max_client_inflight:
            self.stats["refused"] += 1
            why = f"held {self.held}/{self.cfg.high_water}, client {self.per_client[client.bytes]}"
            self._reply(
                client.bytes, proto.encode_status(seq=seq, attempt=attempt, status="busy", message=why)
            )
            return
        self.per_client[client.bytes] += 1
        self.queue.append((client.bytes, header, [header_frame, *frames]))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            worker = self.idle.popleft()
            if worker not in self.procs:  # replaced since it became idle
                continue
            client, header, frames = self.queue.popleft()
            self.assigned[worker] = (client, header.get("id"), header.get("attempt"))
            self.backend.send_multipart([worker, client, *frames], copy=False)

    def _release(self, client: bytes) -> None:
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]

    def _on_backend(self, msg: list) -> None:
        worker, tag, *rest = msg
        worker = worker.bytes
        if tag.bytes == b"READY":
            self.worker_pids[worker] = int(rest[0].bytes)
        elif tag.bytes == b"R":
            client, *reply = rest
            self.assigned.pop(worker, None)
            self._release(client.bytes)
            self.stats["served"] += 1
            self._reply(client.bytes, reply)
        if worker in self.procs:
            self.idle.append(worker)
        self._dispatch()

    def _check_workers(self) -> None:
        for worker, proc in list(self.procs.items()):
            if proc.is_alive() or self.stopping:
                continue
            del self.procs[worker]
            self.worker_pids.pop(worker, None)
            self.stats["restarts"] += 1
            log.warning(
                "I/O worker %s (pid %s) exited with %s; starting another", worker, proc.pid, proc.exitcode
            )
            if worker in self.assigned:
                client, seq, attempt = self.assigned.pop(worker)
                self._release(client)
                why = f"I/O worker process died (exit code {proc.exitcode}) while decoding"
                self._reply(
                    client, proto.encode_status(seq=seq, attempt=attempt, status="error", message=why)
                )
            self._start_worker()

    def health(self, seq: Any = None) -> dict[str, Any]:
        return {
            "status": "pong",
            "id": seq,
            "pid": os.getpid(),
            "address": self.address,
            "fingerprint": self.fingerprint,
            "workers": len(self.worker_pids),
            "worker_pids": sorted(self.worker_pids.values()),
            "idle": len(self.idle),
            "queued": len(self.queue),
            "held": self.held,
            "high_water": self.cfg.high_water,
            "max_client_inflight": self.cfg.max_client_inflight,
            **{k: self.stats[k] for k in ("served", "refused", "restarts", "malformed")},
        }

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        last_check = time.monotonic()
        while not self.stopping:
            events = dict(poller.poll(200))
            if self.backend in events:  # replies first: they free capacity for new requests
                self._on_backend(self.backend.recv_multipart(copy=False))
            if self.frontend in events:
                self._on_frontend(self.frontend.recv_multipart(copy=False))
            if time.monotonic() - last_check > 0.5:
                self._check_workers()
                last_check = time.monotonic()

    def close(self) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self.frontend.close(0)
        self.backend.close(0)
        self.ctx.term()
        self._tmp.cleanup()


def serve(cfg: ServerConfig, *, announce: Any = print) -> None:
    """Run a server until SIGTERM/SIGINT; `announce` gets one JSON line (address, pids) once it is ready."""
    broker = Broker(cfg)

    def stop(signum: int, frame: Any) -> None:
        broker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        broker.wait_ready()
        info = {
            "address": broker.address,
            "pid": os.getpid(),
            "worker_pids": sorted(broker.worker_pids.values()),
        }
        announce(json.dumps(info))
        broker.run()
    finally:
        broker.close()
