"""Server health of the IOClient: each server's connection state, and the probe, pings, heartbeat and
down-marking that keep it current.

`ServerHealth` is mixed into `IOClient` (client.py), which owns the sockets (`servers`), the settings and
the request loop; a hung server's outstanding requests go back to that loop (`_lost`), and the probe waits
on its replies (`_receive`).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq

from keye_train.data.ioserver import protocol as proto

if TYPE_CHECKING:
    from keye_train.data.ioserver.client import _Req

# The client's logger: these are IOClient's messages, filtered and shown under its name.
log = logging.getLogger("keye_train.data.ioserver.client")


@dataclass
class _Server:
    address: str
    sock: zmq.Socket
    monitor: zmq.Socket
    state: str = "probing"  # probing (ping sent, no answer yet) | live | down | incompatible
    outstanding: dict[int, tuple[int, float]] = field(default_factory=dict)  # seq -> (attempt, sent at)
    retry_at: float = 0.0  # when a down server is pinged again
    busy_until: float = 0.0  # it refused a request: prefer the others until then
    last_ping: float = 0.0  # heartbeat: when it was last pinged while holding work
    unanswered_since: float | None = None  # the oldest heartbeat ping it has not answered


class ServerHealth:
    """IOClient's server-health methods; the annotations below are what the client provides."""

    servers: list[_Server]
    fingerprint: str | None
    probe_timeout_s: float
    retry_down_s: float
    hung_s: float
    heartbeat_s: float
    stats: collections.Counter[str]
    _probed: bool

    def _ping(self, s: _Server, now: float) -> None:
        try:
            s.sock.send(proto.pack_header({"op": "ping", "id": None}), zmq.NOBLOCK)
        except zmq.Again:  # not connected (yet); zmq keeps reconnecting in the background
            s.state, s.retry_at = "down", now + (0.05 if not self._probed else 0.5)
            return
        s.state = "live" if s.state == "live" else "probing"
        s.retry_at = now + self.probe_timeout_s  # no pong by then: ping again

    def _on_pong(self, s: _Server, header: dict) -> None:
        if self.fingerprint is not None and header.get("fingerprint") != self.fingerprint:
            if s.state != "incompatible":
                log.error(
                    "I/O server %s decodes with other settings (fingerprint %s, ours %s): not used; "
                    "start it with the trainer's tokenizer and data.image/data.video settings",
                    s.address,
                    header.get("fingerprint"),
                    self.fingerprint,
                )
            s.state = "incompatible"
            return
        if s.state != "live":
            log.info("I/O server %s is up (%s workers)", s.address, header.get("workers"))
        s.state = "live"

    def _probe(self) -> None:
        """Ping every server once and wait (up to probe_timeout_s) until each answered or failed."""
        now = time.monotonic()
        for s in self.servers:
            self._ping(s, now)
        deadline = now + self.probe_timeout_s
        # Wait for every pinged server's answer; refused connections are retried (a server may still be
        # binding its port) until one server is up or the deadline passes.
        while time.monotonic() < deadline and (
            any(s.state == "probing" for s in self.servers)
            or not any(s.state == "live" for s in self.servers)
        ):
            self._receive(wait_s=min(0.05, max(0.0, deadline - time.monotonic())), results={}, reqs={})
            for s in self.servers:  # unreachable at first: zmq reconnects in the background
                if s.state == "down" and time.monotonic() >= s.retry_at:
                    self._ping(s, time.monotonic())
        if not any(s.state == "live" for s in self.servers):
            log.warning(
                "no I/O server of %s answered within %.1fs; decoding locally until one does",
                [s.address for s in self.servers],
                self.probe_timeout_s,
            )
        self._probed = True

    def _mark_down(self, s: _Server, why: str) -> None:
        if s.state == "live":
            log.warning("I/O server %s: %s; using the others", s.address, why)
        if s.state != "incompatible":
            s.state, s.retry_at = "down", time.monotonic() + self.retry_down_s

    def _heartbeat(self, s: _Server, now: float, *, reqs: dict[int, _Req], results: dict) -> None:
        """Ping a live server that holds work; declare it hung when it stays silent for hung_s."""
        if s.state != "live" or not s.outstanding:
            s.unanswered_since = None
            return
        if s.unanswered_since is not None and now - s.unanswered_since > self.hung_s:
            self.stats["hung"] += 1
            s.unanswered_since = None
            self._lost(
                s, f"hung: no answer to pings within hung_timeout_s={self.hung_s}", reqs=reqs, results=results
            )
            return
        if now - s.last_ping >= self.heartbeat_s:
            try:
                s.sock.send(proto.pack_header({"op": "ping", "id": None}), zmq.NOBLOCK)
            except zmq.Again:
                self._lost(s, "not connected", reqs=reqs, results=results)
                return
            s.last_ping = now
            if s.unanswered_since is None:
                s.unanswered_since = now
