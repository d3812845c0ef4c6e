"""Kicks for the kernel path's retransmission timers (bpf/sender.bpf.h).

The TC program keeps a bpf_timer per connection that has data in flight (the retransmission
timer) or a closed window (the zero-window probe timer). A timer callback has no packet to send
with: it marks what is due and queues the connection's tuple on the `kicks` ring buffer. This
thread runs the TC program on a dummy segment of that connection with BPF_PROG_TEST_RUN and
skb->mark = FS_KICK_MARK; the program then sends the resend, probe or reset with
bpf_clone_redirect out of the connection's device (a clone redirected from a test run leaves for
real). Nothing of the segment is built here: addresses, MACs, sequence numbers and bytes all
come from the program's own state.

The same thread is the backstop should a timer or a kick get lost: once a second it kicks every
connection with work out (data in flight or waiting for the window) whose client has been silent
for two RTOs and at least FS_WATCHDOG_MS; the program takes such a kick as an expiry. A
connection whose timer the kernel could not allocate (bpf_timer_init fails with ENOMEM now and
then under load; the program tries again at every packet) is timed by the program's sweeper, one
timer it starts when this thread asks at start, while things are quiet; without a sweeper it is
timed here: the program queues the delay with the tuple and this thread kicks it when the delay
is up (the program takes that as an expiry if the client stayed silent meanwhile). The sweep
kicks such a connection after one RTO.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("fileserver.retransmit")

# struct __sk_buff (uapi, only ever extended): mark is its third __u32. A test run writes the
# context back, so the buffer is larger than the kernel's struct (192 bytes on 6.x), zero-padded.
SKB_CTX_SIZE = 256
SKB_MARK_OFFSET = 8
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
ACK = 0x10
POLL_MS = 200
SWEEP_S = 1.0  # how often silent connections with work out are looked for
LATER_MAX = 65536  # delayed kicks waiting at most (one per timer the kernel could not give)
SWEEPER_PREPARE = 0xFFFFFFFF  # a kick with this sequence number starts the program's sweeper
IDLE_CLOSE = 0xFFFFFFFE  # ... this one marks the connection closing if idle (keepalive.py)
CONN_FIELDS = ("state", "tx_flags", "snd_una", "snd_nxt", "tx_next", "snd_end", "rto_ms", "last_seen_ns")


def kick_frame(family: int, client: bytes, server: bytes, client_port: int, server_port: int,
               delay_ms: int = 0, ack: int = 0) -> bytes:
    """An Ethernet frame client -> server carrying a bare ACK: enough for the program to find
    the connection (ports in network order as in struct fs_tuple, given here as host ints).
    `delay_ms`, in the sequence number, marks the kick of a timer the kernel had no memory for
    (or is IDLE_CLOSE, with the idle time asked for in `ack`)."""
    tcp = struct.pack("!HHIIBBHHH", client_port, server_port, delay_ms, ack, 5 << 4, ACK, 0, 0, 0)
    if family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, client, server)
        return bytes(12) + struct.pack("!H", ETH_P_IP) + ip + tcp
    ip = struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, 64, client, server)
    return bytes(12) + struct.pack("!H", ETH_P_IPV6) + ip + tcp


def tuple_frame(abi: Any, raw_tuple: bytes, delay_ms: int = 0, ack: int = 0) -> bytes:
    """The kick frame for a struct fs_tuple as the program queued it."""
    t = abi.unpack("struct fs_tuple", raw_tuple)
    words = 1 if t["family"] == 4 else 4
    # the addresses are network-order bytes read as host-order words
    client = b"".join(w.to_bytes(4, sys.byteorder) for w in t["client_addr"][:words])
    server = b"".join(w.to_bytes(4, sys.byteorder) for w in t["server_addr"][:words])
    return kick_frame(t["family"], client, server, socket.ntohs(t["client_port"]),
                      socket.ntohs(t["server_port"]), delay_ms, ack)


def kick_context(mark: int) -> bytes:
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("=I", ctx, SKB_MARK_OFFSET, mark)
    return bytes(ctx)


class TimerKicks:
    """Runs the TC program (`prog_fd`) for every tuple the program queues on `kicks`."""

    def __init__(self, maps: Mapping[str, Any], abi: Any, prog_fd: int, port: int = 0) -> None:
        from .libbpf import RingBuffer
        from .stats import FieldReader

        self._abi = abi
        self._prog_fd = prog_fd
        self._ctx = kick_context(abi.const("FS_KICK_MARK"))
        self._ring = RingBuffer(maps["kicks"], self._on_kick)
        self._conns = maps.get("conn_track")
        self._fields = FieldReader(abi, "struct fs_conn", CONN_FIELDS)
        states = abi.enum("fs_conn_state")
        self._owned = {states["FS_CONN_OPEN"], states["FS_CONN_FIN_SENT"]}
        tx_flags = abi.enum("fs_tx_flags")
        self._one, self._timer = tx_flags["FS_TX_F_ONE"], tx_flags["FS_TX_F_TIMER"]
        self._watchdog_ns = abi.const("FS_WATCHDOG_MS") * 1_000_000
        self._tuple_size = abi.sizeof("struct fs_tuple")
        self._later: list[tuple[int, int, bytes, int]] = []  # (due ns, order, tuple, delay ms)
        self._due: dict[bytes, int] = {}  # tuple -> due ns of its waiting kick
        self._order = itertools.count()
        self._stop = threading.Event()
        self.kicked = self.failed = self.rescued = 0
        self._port = port  # the program's server port: its kicks are segments to it
        self._sweeper = "sweepers" in maps and bool(port)  # still to be started
        self.start_sweeper()
        self._thread = threading.Thread(target=self._run, name="kernel-timer-kicks", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, maps: Mapping[str, Any], abi: Any, interface: str, port: int) -> TimerKicks | None:
        """Kicks for the program attached for `port` on `interface` by this process; None when
        there is none (maps of an object that is not attached here, an object without kicks)."""
        if "kicks" not in maps:
            return None
        fd = attached_program_fd(interface, port)
        if fd is None:
            log.info("no TC program of port %d attached by this process: timer kicks off", port)
            return None
        return cls(maps, abi, fd, port)

    def _on_kick(self, data: bytes) -> None:
        """A record of `kicks`: a tuple to kick now, or one with a delay (struct kick_later in
        bpf/sender.bpf.h: the tuple, then a __u32 of milliseconds) to kick after it."""
        key = data[:self._tuple_size]
        if len(data) >= self._tuple_size + 4:
            delay_ms = max(int.from_bytes(data[self._tuple_size:self._tuple_size + 4], sys.byteorder), 1)
            due = time.monotonic_ns() + delay_ms * 1_000_000
            # one waiting kick per connection, the earliest: when it runs, the program asks
            # again if the connection still needs one (as a restarted timer would)
            if self._due.get(key, due + 1) <= due or len(self._later) >= LATER_MAX:
                return
            self._due[key] = due
            heapq.heappush(self._later, (due, next(self._order), key, delay_ms))
            return
        self._kick(key)

    def _kick(self, key: bytes, delay_ms: int = 0) -> None:
        from .libbpf import prog_test_run

        try:
            prog_test_run(self._prog_fd, tuple_frame(self._abi, key, delay_ms), ctx_in=self._ctx)
            self.kicked += 1
        except Exception as exc:  # a lost kick: the timer fires again, backed off
            self.failed += 1
            log.debug("timer kick failed: %s", exc)

    def close_if_idle(self, key: bytes, idle_ms: int) -> bool:
        """Have the program mark the connection of conn_track key `key` closing if it has been
        silent for `idle_ms` with everything acknowledged (under its lock: a request it answers
        meanwhile is not overwritten); True when it did, and the FIN is ours to send."""
        from .libbpf import prog_test_run

        try:
            frame = tuple_frame(self._abi, key, IDLE_CLOSE, idle_ms)
            return prog_test_run(self._prog_fd, frame, ctx_in=self._ctx).retval == 1
        except OSError as exc:
            log.debug("idle close kick failed: %s", exc)
            return False

    def start_sweeper(self) -> bool:
        """Have the program start its sweeper, the timer of connections without one of their
        own (see bpf/sender.bpf.h): at start, while things are quiet, and at every sweep
        until it runs, since the kernel's allocation fails under load. True once it runs."""
        from .libbpf import prog_test_run

        if not self._sweeper:
            return False
        frame = kick_frame(4, bytes(4), bytes(4), 0, self._port, SWEEPER_PREPARE)
        try:
            running = prog_test_run(self._prog_fd, frame, ctx_in=self._ctx).retval == 1
        except OSError as exc:
            log.debug("starting the sweeper failed: %s", exc)
            return False
        self._sweeper = not running
        return running

    def _kick_due(self) -> int:
        """Run the delayed kicks whose time came; returns ms until the next one (or POLL_MS)."""
        now = time.monotonic_ns()
        while self._later and self._later[0][0] <= now:
            due, _, key, delay_ms = heapq.heappop(self._later)
            if self._due.get(key) == due:
                del self._due[key]
            self._kick(key, delay_ms)
        if not self._later:
            return POLL_MS
        return min(POLL_MS, max(0, (self._later[0][0] - now + 999_999) // 1_000_000))

    def _run(self) -> None:
        # this thread is what retransmits the kernel path's lost tail segments: it must not die
        sweep_at = time.monotonic() + SWEEP_S
        while not self._stop.is_set():
            try:
                self._ring.poll(self._kick_due())
                if time.monotonic() >= sweep_at:
                    sweep_at = time.monotonic() + SWEEP_S
                    self.sweep()
                    self.start_sweeper()
            except Exception as exc:
                log.warning("timer kicks: %s", exc)
                self._stop.wait(0.01)

    def sweep(self, now_ns: int | None = None) -> int:
        """Kick the connections silent with work out (see the module text); returns how many."""
        if self._conns is None:
            return 0
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        get, kicked = self._fields.get, 0
        for key in list(self._conns):
            try:
                raw = self._conns[key]
            except KeyError:
                continue
            if get(raw, "state") not in self._owned or get(raw, "tx_flags") & self._one:
                continue
            if get(raw, "snd_una") == get(raw, "snd_nxt") and get(raw, "tx_next") == get(raw, "snd_end"):
                continue  # nothing out
            if now - get(raw, "last_seen_ns") > self.quiet_ns(get(raw, "tx_flags"), get(raw, "rto_ms")):
                self._kick(key)
                kicked += 1
        self.rescued += kicked
        return kicked

    def quiet_ns(self, tx_flags: int, rto_ms: int) -> int:
        """How long a client with work out may be silent before the sweep kicks it: two RTOs
        and at least FS_WATCHDOG_MS, or one RTO when the connection has no timer (the kernel
        had no memory for it yet); as sender_stalled() in bpf/sender.bpf.h."""
        if not tx_flags & self._timer:
            return rto_ms * 1_000_000
        return max(2 * rto_ms * 1_000_000, self._watchdog_ns)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._ring.close()
        os.close(self._prog_fd)


def attached_program_fd(interface: str, port: int) -> int | None:
    """A new descriptor of the TC program attached for `port` on `interface`, if this process
    holds one (the loader keeps its programs open): found by the attached program's id among
    this process's descriptors, so the cache needs nothing but the maps it is given."""
    from . import kernel, libbpf

    try:
        prog_id = libbpf.tc_query(socket.if_nametoindex(interface), kernel.tc_handle(port),
                                  kernel.TC_PRIORITY)
    except OSError:
        return None
    if not prog_id:
        return None
    wanted = f"prog_id:\t{prog_id}\n"
    for entry in os.scandir("/proc/self/fdinfo"):
        try:
            with open(entry.path) as f:
                if wanted in f.read():
                    return os.dup(int(entry.name))
        except (OSError, ValueError):
            continue
    return None
