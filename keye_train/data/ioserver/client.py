"""IOClient: decodes a planned list of samples on I/O servers and yields the results in request order."""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from keye_train.data.batch import EncodedSample
from keye_train.data.ioserver import protocol as proto
from keye_train.data.ioserver.health import ServerHealth, _Server
from keye_train.data.ioserver.protocol import DecodeRequest, Skip

log = logging.getLogger(__name__)

Result = EncodedSample | Skip


@dataclass
class _Req:
    req: DecodeRequest
    attempt: int = 0  # failed attempts so far (timeouts, errors, lost servers)
    tried: set[str] = field(default_factory=set)
    first_sent: float | None = None
    not_before: float = 0.0
    busy: int = 0


class IOClient(ServerHealth):
    """Submits decode requests to I/O servers with at most `max_in_flight` outstanding, and yields the
    results in request order (each reply carries its request id, so order and resume stay exact).

    A server that holds requests is pinged every `heartbeat_s`; one that answers nothing for `hung_s`
    (stopped, swapped out, wedged: its broker answers pings even while every worker is busy) is marked
    down and its requests are re-sent at once, long before their `timeout_s` (which must cover a slow
    decode) runs out.
    A request that times out, or whose server disconnects or answers with an error, is sent to another
    server, at most `retries` more times; after that, or when no server is usable, it is decoded here with
    `encoder` (a logged warning, counted in `stats["local"]`). A `busy` reply (the server's high-water mark)
    is retried after a short backoff without counting as a failure. With no addresses everything is
    decoded locally. Late replies of an abandoned attempt are dropped, so nothing is returned twice.
    Keep one client for the run (connections and server health persist) and use it from one thread at a
    time (ZeroMQ sockets are not thread-safe).
    """

    def __init__(
        self,
        addresses: list[str],
        *,
        timeout_s: float = 60.0,
        retries: int = 2,
        max_in_flight: int = 16,
        encoder: Any = None,
        ship_bytes: bool = False,
        probe_timeout_s: float = 5.0,
        retry_down_s: float = 10.0,
        hung_s: float = 5.0,
        heartbeat_s: float = 1.0,
    ) -> None:
        if max_in_flight < 1 or retries < 0 or timeout_s <= 0 or hung_s <= 0 or heartbeat_s <= 0:
            raise ValueError(
                f"IOClient: max_in_flight={max_in_flight} >= 1, retries={retries} >= 0, "
                f"timeout_s={timeout_s}, hung_s={hung_s} and heartbeat_s={heartbeat_s} > 0 required"
            )
        self.hung_s, self.heartbeat_s = hung_s, heartbeat_s
        self.timeout_s, self.retries, self.max_in_flight = timeout_s, retries, max_in_flight
        self.encoder, self.ship_bytes = encoder, ship_bytes
        self.probe_timeout_s, self.retry_down_s = probe_timeout_s, retry_down_s
        self.fingerprint = proto.encoder_fingerprint(encoder) if encoder is not None else None
        self.stats: collections.Counter[str] = collections.Counter()
        self.peak_in_flight = 0
        self._seq = 0
        self._ctx = zmq.Context() if addresses else None
        self.servers = [self._connect(a) for a in addresses]
        self._probed = False
        self._retry_queue: list[int] = []  # failed or refused requests, moved to the front of pending

    @classmethod
    def from_config(cls, cfg: Any, *, encoder: Any) -> IOClient:
        """From an IOServerConfig (data.ioserver)."""
        return cls(
            list(cfg.addresses),
            timeout_s=cfg.timeout_s,
            retries=cfg.retries,
            max_in_flight=cfg.max_in_flight,
            encoder=encoder,
            ship_bytes=cfg.ship_bytes,
            probe_timeout_s=cfg.probe_timeout_s,
            retry_down_s=cfg.retry_down_s,
            hung_s=cfg.hung_timeout_s,
        )

    def _connect(self, address: str) -> _Server:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue messages only on completed connections: a send to an unreachable server fails at once
        # (EAGAIN) instead of waiting in a buffer for a server that may never come back.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        return _Server(address=address, sock=sock, monitor=monitor)

    def close(self) -> None:
        for s in self.servers:
            s.sock.disable_monitor()
            s.monitor.close(0)
            s.sock.close(0)
        self.servers = []
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> IOClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return sum(len(s.outstanding) for s in self.servers)

    # ---- the request loop --------------------------------------------------------------------------

    def decode(self, requests: Iterable[DecodeRequest]) -> Iterator[Result]:
        """Yield one EncodedSample or Skip per request, in request order."""
        if not self.servers:
            for req in requests:
                yield self._decode_here(req)
            return
        if not self._probed:
            self._probe()
        source = iter(requests)
        exhausted = False
        order: collections.deque[int] = collections.deque()
        reqs: dict[int, _Req] = {}
        pending: collections.deque[int] = collections.deque()  # to send: new, retried or refused
        results: dict[int, Result] = {}
        # Results held for ordering are bounded too: a slow head request stops new submissions.
        window = 4 * self.max_in_flight
        while True:
            self._receive(wait_s=0.0, results=results, reqs=reqs)
            self._check(reqs=reqs, pending=pending, results=results)
            while not exhausted and len(order) < window:
                try:
                    req = next(source)
                except StopIteration:
                    exhausted = True
                    break
                self._seq += 1
                order.append(self._seq)
                reqs[self._seq] = _Req(req)
                pending.append(self._seq)
            self._send(pending=pending, reqs=reqs, results=results)
            while order and order[0] in results:
                seq = order.popleft()
                reqs.pop(seq, None)
                yield results.pop(seq)
            if exhausted and not order:
                return
            self._receive(wait_s=0.05, results=results, reqs=reqs)

    def _send(self, *, pending: collections.deque, reqs: dict[int, _Req], results: dict) -> None:
        now = time.monotonic()
        deferred = []
        while pending and self.in_flight < self.max_in_flight:
            seq = pending.popleft()
            r = reqs[seq]
            if seq in results:
                continue
            if r.not_before > now:
                deferred.append(seq)
                continue
            server = self._pick(r, now)
            if server is None:
                results[seq] = self._fallback(r, "no I/O server is reachable")
                continue
            if self.ship_bytes and r.req.entry is not None:
                # No shared filesystem: read the sample here (seek + read) and send its bytes.
                try:
                    rec = proto.read_request_record(r.req)
                except Exception as exc:  # a malformed sample: the same skip as local decoding
                    results[seq] = Skip(key=r.req.key, source=r.req.source, reason=proto._reason(exc))
                    continue
                r.req = DecodeRequest(
                    source=r.req.source, kind=r.req.kind, key=r.req.key, shard=r.req.shard, record=rec
                )
            try:
                server.sock.send_multipart(
                    proto.encode_request(r.req, seq=seq, attempt=r.attempt), flags=zmq.NOBLOCK, copy=False
                )
            except zmq.Again:  # the connection is gone: this server is down, the request goes elsewhere
                self._mark_down(server, "not connected")
                pending.appendleft(seq)
                continue
            server.outstanding[seq] = (r.attempt, now)
            r.tried.add(server.address)
            r.first_sent = r.first_sent if r.first_sent is not None else now
            self.stats["sent"] += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        pending.extendleft(reversed(deferred))

    def _pick(self, r: _Req, now: float) -> _Server | None:
        live = [s for s in self.servers if s.state == "live"]
        if not live:
            return None
        # Another server than the ones that failed this request, not refusing, least loaded.
        return min(live, key=lambda s: (s.address in r.tried, s.busy_until > now, len(s.outstanding)))

    def _receive(self, *, wait_s: float, results: dict, reqs: dict[int, _Req]) -> None:
        poller = zmq.Poller()
        for s in self.servers:
            poller.register(s.sock, zmq.POLLIN)
            poller.register(s.monitor, zmq.POLLIN)
        events = dict(poller.poll(int(wait_s * 1000)))
        for s in self.servers:
            # Drain everything that arrived (also while the caller was busy) before any deadline is judged.
            while s.sock in events and s.sock.poll(0):
                s.unanswered_since = None  # any message shows it is alive
                self._on_reply(s, s.sock.recv_multipart(copy=False), results=results, reqs=reqs)
            while s.monitor in events and s.monitor.poll(0):
                if recv_monitor_message(s.monitor)["event"] == zmq.EVENT_DISCONNECTED:
                    self._lost(s, "disconnected", reqs=reqs, results=results)

    def _on_reply(self, s: _Server, frames: list, *, results: dict, reqs: dict[int, _Req]) -> None:
        try:
            header = proto.unpack_header(frames[0].bytes)
        except proto.ProtocolError as exc:
            log.error("I/O server %s sent a malformed reply: %s", s.address, exc)
            self.stats["malformed"] += 1
            return
        status, seq = header.get("status"), header.get("id")
        if status == "pong":
            self._on_pong(s, header)
            return
        attempt = header.get("attempt")
        entry = s.outstanding.get(seq) if isinstance(seq, int) else None
        current = entry is not None and entry[0] == attempt  # else an older attempt on this server
        if current:
            s.outstanding.pop(seq)
        r = reqs.get(seq) if isinstance(seq, int) else None
        if r is None or seq in results:
            self.stats["stale"] += 1  # an abandoned attempt answered after all: already resolved
            return
        if status in ("ok", "skip"):
            try:
                results[seq] = proto.decode_result(header, [f.buffer for f in frames[1:]])
            except proto.ProtocolError as exc:
                log.error("I/O server %s: unreadable result for %s: %s", s.address, r.req.key, exc)
                self._failed(r, seq, s, f"unreadable reply: {exc}", results=results)
                return
            self.stats["ok" if status == "ok" else "skip"] += 1
        elif not current or attempt != r.attempt:
            self.stats["stale"] += 1  # an old attempt failed; the current one is still under way
        elif status == "busy":
            self.stats["busy"] += 1
            r.busy += 1
            backoff = min(0.2, 0.005 * 2 ** min(r.busy, 6))
            s.busy_until = r.not_before = time.monotonic() + backoff
            if time.monotonic() - (r.first_sent or 0.0) > self.timeout_s * (self.retries + 1):
                results[seq] = self._fallback(r, f"servers stayed busy ({header.get('message')})")
            else:
                self._retry_queue.append(seq)
        else:
            self._failed(r, seq, s, f"error: {header.get('message')}", results=results)

    def _failed(self, r: _Req, seq: int, s: _Server, why: str, *, results: dict) -> None:
        r.attempt += 1
        self.stats["failed_attempts"] += 1
        log.warning("I/O request %s (%s) failed on %s: %s", seq, r.req.key, s.address, why)
        if r.attempt > self.retries:
            results[seq] = self._fallback(r, f"{r.attempt} attempts failed, last: {why}")
        else:
            self._retry_queue.append(seq)

    def _lost(self, s: _Server, why: str, *, reqs: dict[int, _Req], results: dict) -> None:
        self._mark_down(s, why)
        for seq in list(s.outstanding):
            s.outstanding.pop(seq)
            if seq in reqs and seq not in results:
                self._failed(reqs[seq], seq, s, why, results=results)

    def _check(self, *, reqs: dict[int, _Req], pending: collections.deque, results: dict) -> None:
        """Timeouts, re-pings of down servers, and requeueing of what must be sent again."""
        now = time.monotonic()
        for s in self.servers:
            expired = [seq for seq, (_, sent) in s.outstanding.items() if now - sent > self.timeout_s]
            for seq in expired:
                s.outstanding.pop(seq)
                self.stats["timeouts"] += 1
                if seq in reqs and seq not in results:
                    self._mark_down(s, f"no reply within timeout_s={self.timeout_s}")
                    self._failed(reqs[seq], seq, s, "timeout", results=results)
            if s.state in ("down", "probing") and now >= s.retry_at:
                self._ping(s, now)
            self._heartbeat(s, now, reqs=reqs, results=results)
        # Retries go first: they are the oldest requests, which the in-order output is waiting for.
        retry = sorted(set(self._retry_queue))
        self._retry_queue.clear()
        pending.extendleft(reversed([seq for seq in retry if seq not in results]))

    def _fallback(self, r: _Req, why: str) -> Result:
        self.stats["local"] += 1
        n = self.stats["local"]
        if n == 1 or n % 1000 == 0:
            log.warning("decoding %s locally (%d so far): %s", r.req.key, n, why)
        return self._decode_here(r.req)

    def _decode_here(self, req: DecodeRequest) -> Result:
        if self.encoder is None:
            raise RuntimeError(f"sample {req.key!r} must be decoded locally but IOClient has no encoder")
        return proto.decode_request(req, encoder=self.encoder)
