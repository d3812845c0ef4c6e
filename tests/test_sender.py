"""The sender's loss recovery and its lock, on crafted packets through BPF_PROG_TEST_RUN.

The connections and the capture of what leaves come from tests/test_prog.py (a client driven
through test_run, clones captured on the host end of a veth pair). Here the client's ACKs carry
SACK blocks, so what is checked is what RFC 6675 and RACK's idea ask of the sender: every hole an
ACK shows lost goes out again at once (not one per round trip), a resend that was lost too goes
again once data sent after it arrived, a D-SACK is no duplicate ACK, the tail loss probe is the
last segment again; and what the program does when the cached version of an answer in flight is
gone, or when another CPU holds the connection's lock.
"""

from __future__ import annotations

import os
import struct
import sys
import time

import pytest

from test_prog import (ACK, FIN, PORT, PSH, RST, TC_ACT_REDIRECT, TC_ACT_SHOT, Client, Prog, Segment, burst,
                       delta, get, kick_queued, packet, parse, payload_of, prog, silent_then_swept, wire,
                       Wire)  # noqa: F401

pytestmark = pytest.mark.bpf

SEG = 1448  # the cookie's MSS 1460 less timestamps


def sack(c: Client, ack: int, blocks: list[tuple[int, int]]) -> tuple[int, bytes]:
    """An ACK of `ack` with these SACK blocks (left, right edge), timestamps as the client's."""
    opts = c.options()
    if blocks:
        opts += b"\x01\x01" + bytes([5, 2 + 8 * len(blocks)]) + b"".join(
            struct.pack("!II", left & 0xFFFFFFFF, right & 0xFFFFFFFF) for left, right in blocks)
    return c.prog.run(packet(c.family, c.port, PORT, c.seq, ack, ACK, opts, window=c.window), c.ifindex)


def start(prog: Prog, wire: Wire, name: str) -> tuple[Client, list[Segment]]:
    """A connection, a request for `name` and the first burst of its answer."""
    c = Client(prog, ifindex=wire.ifindex).connect()
    wire.drain()
    raw = get(f"/{name}")
    verdict, out = c.send(ACK | PSH, raw)
    c.seq += len(raw)
    return c, burst(wire, verdict, out)


def end(s: Segment) -> int:
    return s.seq + len(s.payload)


def test_every_hole_one_ack_shows_is_resent_at_once(prog: Prog, wire: Wire):
    """Segments 1 and 4 of nine were lost. The ACK for segment 0 SACKs the rest: both holes go
    out again in this one run (RFC 6675), the window halves, fast recovery begins."""
    c, segs = start(prog, wire, "big.bin")
    assert len(segs) == 9  # 12,000 bytes and a head: within the initial window
    before = prog.counters()
    verdict, out = sack(c, segs[1].seq, [(segs[2].seq, segs[4].seq), (segs[5].seq, end(segs[-1]))])
    resent = burst(wire, verdict, out)
    assert [(s.seq, s.payload) for s in resent] == [(segs[1].seq, segs[1].payload),
                                                    (segs[4].seq, segs[4].payload)]
    assert delta(before, prog.counters())["retransmit_fast"] == 2
    conn = prog.conn(c)
    flags = prog.cache.abi.enum("fs_tx_flags")
    assert conn["tx_flags"] & flags["FS_TX_F_RECOVERY"]
    assert conn["ssthresh"] == conn["cwnd"] == end(segs[-1]) - segs[0].seq >> 1  # half of the flight
    # the holes arrived: the full ACK ends recovery, nothing is sent again
    verdict, _ = sack(c, end(segs[-1]), [])
    assert verdict == TC_ACT_SHOT and not prog.conn(c)["tx_flags"] & flags["FS_TX_F_RECOVERY"]


def test_a_lost_resend_goes_again_once_later_data_arrives(prog: Prog, wire: Wire):
    """Segment 1 of the first ten is lost; its resend goes first and new data after it. The
    client then SACKs that new data while segment 1 is still missing: the resend was lost too,
    and goes again without waiting for the retransmission timer."""
    c, segs = start(prog, wire, "k40.bin")
    assert len(segs) == 10  # the initial window
    verdict, out = sack(c, segs[1].seq, [(segs[2].seq, end(segs[-1]))])
    first = burst(wire, verdict, out)
    assert first[0].seq == segs[1].seq and len(first) > 1, "the resend, then new data"
    assert all(s.seq >= end(segs[-1]) for s in first[1:])
    before = prog.counters()
    verdict, out = sack(c, segs[1].seq, [(segs[2].seq, end(first[-1]))])
    again = burst(wire, verdict, out)
    assert again and (again[0].seq, again[0].payload) == (segs[1].seq, segs[1].payload)
    assert delta(before, prog.counters())["retransmit_fast"] == 1
    assert "rto_expiries" not in delta(before, prog.counters())


def test_a_lost_resend_at_the_tail_goes_again_at_the_probe_timeout(prog: Prog, wire: Wire):
    """Segment 1 of the whole answer (nine segments) is lost, and so is its resend, the last
    thing sent: no later data can show that loss, so when fast recovery goes quiet the probe
    timeout (2 RTT, not the RTO) sends the hole again, without the RTO's collapse of the window;
    once per snd_una."""
    c, segs = start(prog, wire, "big.bin")
    assert len(segs) == 9 and prog.conn(c)["snd_end"] == end(segs[-1]), "all of the answer is out"
    verdict, out = sack(c, segs[1].seq, [(segs[2].seq, end(segs[-1]))])
    (resend,) = burst(wire, verdict, out)
    assert resend.seq == segs[1].seq
    cwnd = prog.conn(c)["cwnd"]
    before = prog.counters()
    assert kick_queued(prog, c, 2.0), "the probe timeout runs in recovery"
    c.kick()
    (again,) = wire.segments(count=1)
    assert (again.seq, again.payload) == (segs[1].seq, segs[1].payload)
    # (counters are shared with the module's other connections, whose timers may run meanwhile)
    assert delta(before, prog.counters())["recovery_probes"] >= 1
    flags = prog.cache.abi.enum("fs_tx_flags")
    conn = prog.conn(c)
    assert conn["cwnd"] == cwnd and conn["tx_flags"] & flags["FS_TX_F_RECOVERY"]
    assert not conn["tx_flags"] & flags["FS_TX_F_LOSS"], "no RTO"
    assert kick_queued(prog, c, 2.0)
    c.kick()
    conn = prog.conn(c)
    assert conn["tx_flags"] & flags["FS_TX_F_LOSS"] and conn["cwnd"] == SEG, "then the RTO proper"
    sack(c, end(segs[-1]), [])  # all of it arrived: no work left for later tests' watchdog to find
    assert not prog.conn(c)["tx_flags"] & (flags["FS_TX_F_LOSS"] | flags["FS_TX_F_RECOVERY"])


def test_a_dsack_is_no_duplicate_ack(prog: Prog, wire: Wire):
    """ACKs that only report a duplicate (a D-SACK block below the ACK, RFC 2883) show no loss:
    three of them start no fast retransmit, where three plain duplicate ACKs would."""
    c, segs = start(prog, wire, "big.bin")
    verdict, _ = sack(c, segs[3].seq, [])
    before = prog.counters()
    for _ in range(4):
        verdict, out = sack(c, segs[3].seq, [(segs[1].seq, segs[2].seq)])
        assert verdict == TC_ACT_SHOT
    assert "retransmit_fast" not in delta(before, prog.counters())
    assert prog.conn(c)["dupacks"] == 0
    for _ in range(3):  # the same without the D-SACK: the third one resends segment 3
        verdict, out = sack(c, segs[3].seq, [])
    assert verdict == TC_ACT_REDIRECT and parse(out).seq == segs[3].seq


def test_the_tail_loss_probe_is_the_last_segment_sent(prog: Prog, wire: Wire):
    """Nothing comes back for the initial window of a longer answer: the probe (2 RTT) sends
    the last segment sent again, not new data, since a client acknowledges a duplicate at once
    and may hold new data under its delayed ACK."""
    c, segs = start(prog, wire, "k40.bin")
    assert prog.conn(c)["snd_end"] > end(segs[-1]), "more of the answer is waiting"
    before = prog.counters()
    assert kick_queued(prog, c, 2.0)
    c.kick()
    (probe,) = wire.segments(count=1)
    assert (probe.seq, probe.payload) == (segs[-1].seq, segs[-1].payload)
    assert delta(before, prog.counters())["tail_probes"] == 1


def test_an_answer_whose_version_is_gone_resets_the_connection(prog: Prog, wire: Wire):
    """The cache replaces a file's version while an answer from it is in flight: its next
    segments cannot be made; the connection is reset at once, not after every resend failed."""
    c, segs = start(prog, wire, "k40.bin")
    before = prog.counters()
    assert prog.cache.remove("k40.bin")  # its chunks go with it
    try:
        verdict, out = sack(c, end(segs[1]), [])
        (reset,) = burst(wire, verdict, out)
        assert reset.flags & RST and not reset.payload
        moved = delta(before, prog.counters())
        assert moved["version_gone"] == 1 and "errors" not in moved and "rto_resets" not in moved
        assert prog.conn(c) is None
    finally:
        assert prog.cache.add("k40.bin")


def test_a_packet_of_a_connection_another_cpu_holds_waits_then_gives_up(prog: Prog, wire: Wire):
    """Every lock slot held (as if other CPUs were working on them): the program spins for a
    bounded time, counts the wait and the give-up and drops the packet; once released, the
    same packet is taken."""
    c, segs = start(prog, wire, "big.bin")
    locks = prog.maps["conn_locks"]
    slots = [i.to_bytes(4, "little") for i in range(locks.max_entries)]
    before = prog.counters()
    for key in slots:
        locks[key] = (1).to_bytes(4, "little")
    try:
        verdict, _ = sack(c, end(segs[-1]), [])
    finally:
        for key in slots:
            locks[key] = bytes(4)
    moved = delta(before, prog.counters())
    assert verdict == TC_ACT_SHOT and moved["lock_waits"] == 1 and moved["lock_timeouts"] == 1
    assert prog.conn(c)["snd_una"] == segs[0].seq, "the ACK was not taken"
    verdict, _ = sack(c, end(segs[-1]), [])
    assert verdict == TC_ACT_SHOT and prog.conn(c)["snd_una"] == end(segs[-1])
    assert payload_of(segs, segs[0].seq)  # (the answer itself was whole and in order)


def timerless(prog: Prog, wire: Wire) -> tuple[Client, list[Segment], bytes]:
    """A connection with an answer in flight whose timer is gone, as after a user-space rewrite
    of its value (what a connection the kernel had no timer memory for looks like); its key."""
    c, segs = start(prog, wire, "big.bin")
    abi = prog.cache.abi
    key = abi.pack("struct fs_tuple", c.tuple_fields())
    conn = prog.conn(c)
    conn["tx_flags"] &= ~abi.enum("fs_tx_flags")["FS_TX_F_TIMER"]
    prog.maps["conn_track"][key] = abi.pack("struct fs_conn", conn)  # its timer goes with it
    return c, segs, key


def segments_to(wire: Wire, c: Client, seconds: float = 2) -> list[Segment]:
    """The first segments sent to c's port within `seconds`."""
    deadline = time.monotonic() + seconds
    mine: list[Segment] = []
    while not mine and time.monotonic() < deadline:
        mine = [s for s in wire.segments(timeout=0.1) if s.dport == c.port]
    return mine


def test_a_connection_the_kernel_had_no_timer_for_is_timed_by_user_space(prog: Prog, wire: Wire):
    """bpf_timer_init fails with ENOMEM now and then under load; the program then queues the
    delay on `kicks` (struct kick_later) and user space kicks the connection when it is up,
    which the program takes as an expiry: here the probe timeout, so the last segment again.
    (The record is fed to user space's handler directly; the timer is gone as after a
    user-space rewrite of the value, which is what a connection without one looks like.)"""
    from fileserver_ctl.retransmit import TimerKicks

    c, segs, key = timerless(prog, wire)
    abi = prog.cache.abi
    before = prog.counters()
    kicks = TimerKicks(prog.maps, abi, os.dup(prog.fd))
    try:
        kicks._on_kick(key + struct.pack("=II", 300, 0))  # as conn_timer_later() queues it
        assert [s for s in wire.segments(timeout=0.15) if s.dport == c.port] == [], "not before the delay"
        mine = segments_to(wire, c)
    finally:
        kicks.close()
    assert [(s.seq, s.payload) for s in mine] == [(segs[-1].seq, segs[-1].payload)]
    moved = delta(before, prog.counters())
    assert moved["kicks_later"] == 1 and moved["tail_probes"] == 1
    assert prog.conn(c)["tx_flags"] & abi.enum("fs_tx_flags")["FS_TX_F_TIMER"], "armed again meanwhile"


def test_the_probe_of_a_closing_answer_carries_its_last_data(prog: Prog, wire: Wire):
    """The last segment of a Connection: close answer carries our FIN; it was lost and all
    before it arrived. The probe is that segment again, data and FIN, not a bare FIN the client
    could only queue out of order."""
    c = Client(prog, ifindex=wire.ifindex).connect()
    wire.drain()
    raw = get("/big.bin", "Connection: close\r\n")
    verdict, out = c.send(ACK | PSH, raw)
    c.seq += len(raw)
    segs = burst(wire, verdict, out)
    assert segs[-1].flags & FIN and segs[-1].payload
    sack(c, segs[-1].seq, [])
    assert kick_queued(prog, c, 2.0)
    c.kick()
    (probe,) = [s for s in wire.segments(timeout=0.2) if s.dport == c.port]
    assert (probe.seq, probe.payload, probe.flags & FIN) == (segs[-1].seq, segs[-1].payload, FIN)


def test_the_watchdog_rescues_a_connection_that_cwnd_holds_back(prog: Prog, wire: Wire):
    """A longer answer: the initial window is out, the rest waits for ACKs that never come, and
    the connection lost its timer. Unsent data is no reason for the watchdog's kick to skip the
    expiry (nothing else would send it): the probe goes out."""
    c, segs = start(prog, wire, "k40.bin")
    conn = prog.conn(c)
    assert conn["tx_next"] != conn["snd_end"], "data waiting for the window"
    mine, moved = silent_then_swept(prog, wire, c)
    assert [(s.seq, s.payload) for s in mine] == [(segs[-1].seq, segs[-1].payload)]
    assert moved["watchdog_kicks"] >= 1


def test_the_sweeper_times_a_connection_without_a_timer(prog: Prog, wire: Wire):
    """A connection the kernel had no timer memory for goes on `timerless`, and the sweeper
    (one timer the program starts when user space asks, at start) expires it when its time
    comes, as its own timer would have: here the probe timeout, so the last segment again. (The
    entry is written here as the program writes it; the connection's timer is gone as after a
    user-space rewrite of its value.)"""
    from fileserver_ctl.retransmit import TimerKicks

    c, segs, key = timerless(prog, wire)
    before = prog.counters()
    kicks = TimerKicks(prog.maps, prog.cache.abi, os.dup(prog.fd), PORT)
    try:
        assert not kicks._sweeper, "the sweeper runs: started with the kick thread"
        due = time.clock_gettime_ns(time.CLOCK_MONOTONIC) + 50_000_000
        prog.maps["timerless"][key] = due.to_bytes(8, sys.byteorder)
        mine = segments_to(wire, c)
    finally:
        kicks.close()
    assert [(s.seq, s.payload) for s in mine] == [(segs[-1].seq, segs[-1].payload)]
    moved = delta(before, prog.counters())
    assert moved["tail_probes"] == 1 and "kicks_later" not in moved and "watchdog_kicks" not in moved
