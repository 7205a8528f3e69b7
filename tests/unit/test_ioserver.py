"""I/O server: wire format, and servers on loopback giving exactly what local decoding gives, in order."""

import logging
import os
import random
import signal
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch
import webdataset as wds
import zmq

from keye_train.cli.ioserver import _key_values
from keye_train.data.batch import EncodedSample
from keye_train.data.ioserver import protocol as proto
from keye_train.data.ioserver.config import DecodeRequest, IOClient, IOServerConfig, Skip, decode_many
from keye_train.data.ioserver.server import ServerConfig
from keye_train.data.loader.encode import SampleEncoder, SkipCounter, iter_source_samples
from keye_train.data.media.image import ImageConfig
from keye_train.data.shards.index import build_index, load_index
from keye_train.data.shards.manifest import SourceConfig, load_manifest
from keye_train.data.shards.sources import iter_raw
from keye_train.data.synth.shards import SynthConfig, synth_dataset
from keye_train.data.text.tokenizer import load_tokenizer
from keye_train.testing.ioserver_local import LocalServer

FIELDS = ("input_ids", "labels", "position_ids", "pixel_values", "grid_thw")


def _corrupt(kind: str, raw: dict) -> dict:
    """A broken copy of a good sample: each kind fails at a different stage (decode, JSON, parse)."""
    bad = dict(raw, __key__=raw["__key__"] + "_bad")
    if kind == "caption":
        ext = next(k for k in bad if k in ("jpg", "png"))
        bad[ext] = bad[ext][: len(bad[ext]) // 3]
    elif kind == "conversation":
        bad["json"] = b"{"
    elif kind == "interleaved":
        bad["json"] = b'{"content": "not a list"}'
    elif kind == "video":
        bad["mp4"] = bad["mp4"][: len(bad["mp4"]) // 2]
    else:
        bad["txt"] = b"\xff\xfe"
    return bad


class _Recorder(SkipCounter):
    """The local pipeline's skips, in the order they happen between its samples."""

    def __init__(self, events: list) -> None:
        super().__init__(max_skip_rate=1.0, log_every=10**9)
        self.events = events

    def skip(self, source: str, key: str, reason: str, *, enforce: bool = True) -> None:
        super().skip(source, key, reason, enforce=enforce)
        self.events.append(Skip(key=key, source=source, reason=reason))


@dataclass
class Data:
    tokenizer: str
    encoder: SampleEncoder
    sources: list[SourceConfig]
    raw_requests: list[DecodeRequest]
    entry_requests: list[DecodeRequest]
    expected: list  # EncodedSample | Skip per sample, from the local streaming pipeline


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    tmp = tmp_path_factory.mktemp("ioserver")
    synth_dataset(SynthConfig(out=tmp / "synth", samples=10, seed=3))
    manifest = load_manifest(tmp / "synth")
    encoder = SampleEncoder(load_tokenizer(manifest.tokenizer))
    sources, raw_requests, entry_requests, expected = [], [], [], []
    for src in manifest.sources:
        raws = [
            {k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")} for r in iter_raw(src)
        ]
        path = tmp / f"{src.kind}-mixed.tar"
        with wds.TarWriter(str(path), encoder=False) as writer:
            for raw in [*raws, _corrupt(src.kind, raws[0])]:
                writer.write(raw)
        source = SourceConfig(name=src.name, kind=src.kind, shards=[str(path)], weight=1.0)
        sources.append(source)
        for raw in iter_raw(source):
            members = {k: v for k, v in raw.items() if not k.startswith("__")}
            raw_requests.append(DecodeRequest(source.name, source.kind, raw["__key__"], raw=members))
        build_index(path, kind=source.kind)
        for entry in load_index(path, kind=source.kind):
            entry_requests.append(
                DecodeRequest(source.name, source.kind, entry.key, shard=str(path), entry=entry)
            )
        events: list = []
        for sample in iter_source_samples(source, encoder=encoder, counter=_Recorder(events)):
            events.append(sample)
        expected += events
    assert sum(isinstance(e, Skip) for e in expected) == 5, expected  # one bad sample per kind
    return Data(manifest.tokenizer, encoder, sources, raw_requests, entry_requests, expected)


def assert_same(results: list, expected: list) -> None:
    assert [r.key for r in results] == [e.key for e in expected]  # nothing lost, duplicated or reordered
    for got, want in zip(results, expected):
        assert type(got) is type(want), (got.key, got, want)
        if isinstance(want, Skip):
            assert got == want
            continue
        assert (got.source, got.kind) == (want.source, want.kind)
        for name in FIELDS:
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and torch.equal(a, b), (got.key, name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- wire format (no processes) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(12, dtype=torch.int64).reshape(3, 4),
        torch.randn(2, 3, 14, 14),
        torch.randn(5, 7).to(torch.bfloat16),
        torch.empty(0, 3, 14, 14),
        torch.randn(4, 6)[:, ::2],  # non-contiguous
    ],
)
def test_tensor_frames_round_trip(tensor):
    meta, buf = proto.tensor_frame(tensor)
    back = proto.tensor_from_frame(meta, bytes(buf))
    assert back.dtype == tensor.dtype and back.shape == tensor.shape and torch.equal(back, tensor)


def test_malformed_frames_are_refused():
    meta, buf = proto.tensor_frame(torch.zeros(4))
    with pytest.raises(proto.ProtocolError, match="dtype"):
        proto.tensor_from_frame({**meta, "dtype": "object"}, buf)
    with pytest.raises(proto.ProtocolError, match="needs 16 bytes"):
        proto.tensor_from_frame(meta, bytes(buf)[:-1])
    with pytest.raises(proto.ProtocolError, match="shape"):
        proto.tensor_from_frame({**meta, "shape": [-1]}, buf)
    with pytest.raises(proto.ProtocolError, match="not JSON"):
        proto.unpack_header(b"\x80\x03pickle")
    with pytest.raises(proto.ProtocolError, match="protocol"):
        proto.unpack_header(b'{"v": 99}')


def test_requests_and_results_round_trip(data):
    for req in (data.raw_requests[0], data.entry_requests[-1]):
        header_frame, *frames = proto.encode_request(req, seq=7, attempt=1)
        header = proto.unpack_header(header_frame)
        assert (header["id"], header["attempt"]) == (7, 1)
        assert proto.decode_request_frames(header, [bytes(f) for f in frames]) == req
    sample = next(e for e in data.expected if isinstance(e, EncodedSample) and e.pixel_values.numel())
    for result in (sample, Skip(key="k", source="s", reason="ValueError: bad")):
        header_frame, *frames = proto.encode_result(result, seq=3, attempt=0)
        back = proto.decode_result(proto.unpack_header(header_frame), [bytes(f) for f in frames])
        assert_same([back], [result])


def test_configs_validate_with_the_key_named(data):
    with pytest.raises(ValueError, match=r"addresses\[0\]"):
        IOServerConfig(addresses=["127.0.0.1:5555"])
    with pytest.raises(ValueError, match="max_in_flight=0"):
        IOServerConfig(max_in_flight=0)
    with pytest.raises(ValueError, match="timeout_s"):
        IOServerConfig(timeout_s=0)
    with pytest.raises(ValueError, match="workers=0"):
        ServerConfig(bind="tcp://127.0.0.1:0", tokenizer=data.tokenizer, workers=0)
    with pytest.raises(ValueError, match="image.max_tokens"):
        ServerConfig(bind="tcp://127.0.0.1:0", tokenizer=data.tokenizer, image={"max_tokens": 0})
    with pytest.raises(ValueError, match="ioserver.video"):
        ServerConfig(bind="tcp://127.0.0.1:0", tokenizer=data.tokenizer, video={"no_such_field": 1})
    with pytest.raises(ValueError, match="exactly one"):
        DecodeRequest("s", "caption", "k")
    assert _key_values(["fps=1.5", "max_frames=null", "mean=[0.5, 0.5, 0.5]"], "--video") == {
        "fps": 1.5,
        "max_frames": None,
        "mean": (0.5, 0.5, 0.5),
    }


def test_decode_many_without_servers_is_local_decoding(data):
    results = list(decode_many(data.entry_requests, config=IOServerConfig(), encoder=data.encoder))
    assert_same(results, data.expected)


def test_no_server_reachable_falls_back_to_local(data, caplog):
    address = f"tcp://127.0.0.1:{_free_port()}"  # nothing listens there
    with (
        caplog.at_level(logging.WARNING),
        IOClient([address], encoder=data.encoder, probe_timeout_s=0.5) as c,
    ):
        results = list(c.decode(data.raw_requests))
    assert_same(results, data.expected)
    assert c.stats["local"] == len(data.raw_requests) and c.stats["sent"] == 0
    assert "no I/O server" in caplog.text and "decoding" in caplog.text


def _fake_server(address_box: list, fingerprint: str, held_peak: list, stop: threading.Event) -> None:
    """A ROUTER that holds requests and answers a random held one only when the client sends no more:
    the number held is exactly the client's in-flight count."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    address_box.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    held, rng = [], random.Random(0)
    try:
        while not stop.is_set():
            if sock.poll(50):
                client, header_frame, *frames = sock.recv_multipart()
                header = proto.unpack_header(header_frame)
                if header["op"] == "ping":
                    sock.send_multipart(
                        [client, proto.pack_header({"status": "pong", "fingerprint": fingerprint})]
                    )
                else:
                    held.append((client, header))
                    held_peak[0] = max(held_peak[0], len(held))
            elif held:  # quiet for 50 ms: the client is at its bound; answer one, out of order
                client, header = held.pop(rng.randrange(len(held)))
                skip = Skip(key=header["key"], source=header["source"], reason="held by the fake server")
                sock.send_multipart(
                    [client, *proto.encode_result(skip, seq=header["id"], attempt=header["attempt"])]
                )
    finally:
        sock.close(0)
        ctx.term()


def test_client_in_flight_bound_and_request_order(data):
    stop, box, peak = threading.Event(), [], [0]
    fp = proto.encoder_fingerprint(data.encoder)
    thread = threading.Thread(target=_fake_server, args=(box, fp, peak, stop), daemon=True)
    thread.start()
    try:
        while not box:
            time.sleep(0.01)
        requests = data.raw_requests[:20]
        with IOClient(box, encoder=data.encoder, max_in_flight=4, timeout_s=30) as client:
            results = list(client.decode(requests))
    finally:
        stop.set()
        thread.join(timeout=10)
    assert [r.key for r in results] == [r.key for r in requests]  # answered out of order, yielded in order
    assert all(isinstance(r, Skip) and r.reason == "held by the fake server" for r in results)
    assert peak[0] == 4  # reached, never exceeded
    assert client.stats["local"] == 0


# ---- servers on loopback (multi-process) ------------------------------------------------------------


@pytest.fixture(scope="module")
def server(data):
    srv = LocalServer(
        data.tokenizer, workers=1, extra_args=["--high-water", "4", "--max-client-inflight", "3"]
    )
    yield srv
    srv.stop()


@pytest.mark.dist
@pytest.mark.parametrize("form", ["raw", "entry", "entry_ship_bytes"])
def test_server_results_equal_local_decoding(server, data, form):
    requests = data.raw_requests if form == "raw" else data.entry_requests
    with IOClient(
        [server.address], encoder=data.encoder, max_in_flight=3, ship_bytes=form.endswith("bytes")
    ) as c:
        results = list(c.decode(requests))
    assert_same(results, data.expected)
    assert c.stats["local"] == 0
    if form != "entry_ship_bytes":  # shipping bytes finds the bad JSON here, before sending
        assert c.stats["ok"] + c.stats["skip"] == len(requests)


@pytest.mark.dist
def test_server_with_other_settings_is_not_used(server, data):
    other = SampleEncoder(data.encoder.tok, image_cfg=ImageConfig(max_tokens=64))
    with IOClient([server.address], encoder=other, probe_timeout_s=2) as c:
        results = list(c.decode(data.raw_requests[:3]))
    assert c.stats["sent"] == 0 and c.stats["local"] == 3
    assert [r.key for r in results] == [r.key for r in data.raw_requests[:3]]


def _collect(sock: zmq.Socket, want: int, *, limit_s: float = 60.0) -> list[dict]:
    headers, deadline = [], time.monotonic() + limit_s
    while len(headers) < want and time.monotonic() < deadline:
        if sock.poll(100):
            headers.append(proto.unpack_header(sock.recv_multipart()[0]))
    return headers


@pytest.mark.dist
def test_server_refuses_beyond_high_water(server, data):
    """With its worker stopped nothing completes, so exactly high_water (4) requests are held, at most
    max_client_inflight (3) per client; every other one is answered `busy` at once."""
    ctx = zmq.Context()
    socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
    os.kill(server.worker_pids[0], signal.SIGSTOP)  # a process this test's server started
    try:
        for sock in socks:
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(server.address)
        replies = []
        for sock in socks:  # one client after the other, so which requests are refused is known
            for seq in range(10):
                sock.send_multipart(proto.encode_request(data.raw_requests[-1], seq=seq, attempt=0))
            replies.append(_collect(sock, 10 - (3 if sock is socks[0] else 1)))
        socks[0].send(proto.pack_header({"op": "ping", "id": None}))
        pong = _collect(socks[0], 1)[0]
        assert pong["held"] == 4 and pong["status"] == "pong"  # health answers while workers are busy
        assert sorted(h["id"] for h in replies[0] if h["status"] == "busy") == list(range(3, 10))
        assert sorted(h["id"] for h in replies[1] if h["status"] == "busy") == list(range(1, 10))
        assert all(h["status"] == "busy" for r in replies for h in r)
    finally:
        os.kill(server.worker_pids[0], signal.SIGCONT)
    done = [_collect(socks[0], 3), _collect(socks[1], 1)]
    assert [sorted(h["id"] for h in d) for d in done] == [[0, 1, 2], [0]]
    assert all(h["status"] in ("ok", "skip") for d in done for h in d)
    for sock in socks:
        sock.close(0)
    ctx.term()


@pytest.mark.dist
def test_shard_missing_on_server_is_retried_then_decoded_locally(server, data, tmp_path):
    good = data.entry_requests[0]
    gone = DecodeRequest(good.source, good.kind, good.key, shard=str(tmp_path / "gone.tar"), entry=good.entry)
    with IOClient([server.address], encoder=data.encoder, retries=1) as c:
        results = list(c.decode([good, gone]))
    assert_same(results[:1], data.expected[:1])
    assert isinstance(results[1], Skip) and results[1].reason.startswith("FileNotFoundError")
    assert c.stats["failed_attempts"] == 2 and c.stats["local"] == 1  # 1 + retries attempts, then here


@pytest.mark.dist
def test_dead_worker_is_replaced_and_its_request_answered(server, data):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    worker = server.worker_pids[0]
    try:
        os.kill(worker, signal.SIGSTOP)  # so that it certainly holds the request when it dies
        sock.send_multipart(proto.encode_request(data.raw_requests[0], seq=1, attempt=0))
        time.sleep(0.5)  # let the broker hand it over (the assertion below does not depend on it)
        os.kill(worker, signal.SIGKILL)  # a worker process of this test's server
        (reply,) = _collect(sock, 1)
        assert reply["status"] in ("error", "ok") and reply["id"] == 1
        if reply["status"] == "error":
            assert "died" in reply["message"]
        sock.send_multipart(proto.encode_request(data.raw_requests[0], seq=2, attempt=0))
        (again,) = _collect(sock, 1, limit_s=120)  # served by the replacement worker
        assert again["status"] == "ok" and again["key"] == data.raw_requests[0].key
        sock.send(proto.pack_header({"op": "ping", "id": None}))
        pong = _collect(sock, 1)[0]
        assert pong["restarts"] == 1 and worker not in pong["worker_pids"]
        server.worker_pids = pong["worker_pids"]  # so that the fixture reaps the new one
    finally:
        sock.close(0)
        ctx.term()


@pytest.fixture
def two_servers(data):
    servers = []
    try:
        for _ in range(2):
            servers.append(LocalServer(data.tokenizer, workers=1))
        yield servers
    finally:
        for srv in servers:
            srv.stop()


@pytest.mark.dist
def test_server_killed_mid_run_loses_nothing(two_servers, data):
    """Server A's worker is stopped, so A holds requests when A is killed: they must be re-sent to B."""
    a, b = two_servers
    os.kill(a.worker_pids[0], signal.SIGSTOP)

    def kill_a() -> None:
        os.kill(a.pid, signal.SIGKILL)  # exactly the server this test started
        os.kill(a.worker_pids[0], signal.SIGCONT)  # lets the orphaned worker see its parent is gone

    timer = threading.Timer(1.5, kill_a)
    requests = data.raw_requests * 2
    try:
        with IOClient([a.address, b.address], encoder=data.encoder, max_in_flight=4, timeout_s=60) as c:
            timer.start()
            results = list(c.decode(requests))
    finally:
        timer.join()
    assert_same(results, data.expected * 2)
    assert c.stats["failed_attempts"] >= 1  # A really held requests when it died ...
    assert c.stats["timeouts"] == 0  # ... and they moved on at its disconnection, not after timeout_s
    assert c.stats["local"] == 0


@pytest.mark.dist
def test_a_stopped_server_is_detected_by_heartbeat_and_its_work_resent(two_servers, data):
    """Issue 13: a SIGSTOPped server held requests for a whole timeout_s (57 s). Its worker is stopped
    first so that it certainly holds requests, then the server itself: no pong comes back, and within
    hung_s its requests go to B; nothing is lost or duplicated."""
    a, b = two_servers
    os.kill(a.worker_pids[0], signal.SIGSTOP)
    timer = threading.Timer(1.0, lambda: os.kill(a.pid, signal.SIGSTOP))  # the server this test started
    requests = data.raw_requests * 2
    try:
        with IOClient(
            [a.address, b.address], encoder=data.encoder, max_in_flight=4, timeout_s=120, hung_s=2.0
        ) as c:
            timer.start()
            results = list(c.decode(requests))
    finally:
        timer.join()
        os.kill(a.pid, signal.SIGCONT)  # so that the fixture can stop it
        os.kill(a.worker_pids[0], signal.SIGCONT)
    assert_same(results, data.expected * 2)
    assert c.stats["hung"] == 1 and c.stats["failed_attempts"] >= 1  # A held requests and was given up
    assert c.stats["timeouts"] == 0  # detected by the heartbeat, not after timeout_s
    assert c.stats["local"] == 0  # re-sent to B
