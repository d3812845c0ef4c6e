"""Idle keep-alive connections the kernel path owns get closed, as user space closes its own.

No kernel socket exists for a connection the TC program owns, and a BPF timer cannot send a
packet, so once a second (KernelCache.refresh_date) user space looks for owned connections
silent for longer than the keep-alive timeout with everything acknowledged, has the program
mark the entry FIN_SENT (a test run, retransmit.TimerKicks.close_if_idle: the program checks again
under the connection's lock, so a request it answers at that moment is not overwritten), then
sends the FIN the program would have sent (sequence numbers and timestamps from conn_track)
through a raw socket; the program then handles the client's FIN/ACK as for any close. Without
the program to ask (maps alone), the entry is marked from here, which can race a request.
"""

from __future__ import annotations

import logging
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, Callable

log = logging.getLogger("fileserver.keepalive")

FIN, ACK = 0x01, 0x10
OUR_WINDOW = 65535  # bpf/tcp.bpf.h OUR_WINDOW
TTL = 64


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def fin_packet(family: int, server: bytes, client: bytes, server_port: int, client_port: int,
               seq: int, ack: int, window: int, ts: tuple[int, int] | None) -> bytes:
    """IP header + TCP FIN/ACK from server to client, checksums filled in (ports host order)."""
    options = b"\x01\x01\x08\x0a" + struct.pack("!II", *ts) if ts else b""
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", server_port, client_port, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      doff << 4, FIN | ACK, window, 0, 0) + options
    if family == 4:
        pseudo = server + client + struct.pack("!BBH", 0, 6, len(tcp))
    else:
        pseudo = server + client + struct.pack("!IxxxB", len(tcp), 6)
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    if family == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, TTL, 6, 0, server, client)
        return ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:] + tcp
    return struct.pack("!IHBB16s16s", 0x60000000, len(tcp), 6, TTL, server, client) + tcp


class IdleCloser:
    """Closes owned connections idle for `timeout` seconds; call close_idle() periodically."""

    def __init__(self, maps: Mapping[str, Any], abi: Any, timeout: float) -> None:
        self._conns = maps["conn_track"]
        self._abi = abi
        self.timeout_ns = int(timeout * 1e9)
        states = abi.enum("fs_conn_state")
        self._open, self._fin_sent = states["FS_CONN_OPEN"], states["FS_CONN_FIN_SENT"]
        flags = abi.enum("fs_conn_flags")
        self._tstamp, self._wscale = flags["FS_CONN_F_TSTAMP"], flags["FS_CONN_F_WSCALE"]
        self._sockets: dict[int, socket.socket] = {}
        # (conn_track key, idle ms) -> whether the program marked it closing (see the module doc)
        self.ask: Callable[[bytes, int], bool] | None = None

    def _socket(self, family: int) -> socket.socket:
        if family not in self._sockets:
            af = socket.AF_INET if family == 4 else socket.AF_INET6
            # IPPROTO_RAW: send-only, we write the IP header; it receives nothing
            self._sockets[family] = socket.socket(af, socket.SOCK_RAW, socket.IPPROTO_RAW)
        return self._sockets[family]

    def close_idle(self, now_ns: int | None = None) -> int:
        """Send a FIN on every idle owned connection; returns how many were closed."""
        from .libbpf import UpdateFlags

        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) if now_ns is None else now_ns
        closed = 0
        for key in list(self._conns):
            try:
                raw = self._conns[key]
            except KeyError:
                continue
            c = self._abi.unpack("struct fs_conn", raw)
            # (snd_end: an answer of many segments may wait for the client's window)
            if (c["state"] != self._open or now - c["last_seen_ns"] < self.timeout_ns
                    or c["snd_una"] != c["snd_nxt"] or c["snd_nxt"] != c["snd_end"]):
                continue
            if self.ask is not None:
                if not self.ask(key, self.timeout_ns // 1_000_000):
                    continue  # it spoke meanwhile, or went
            else:
                marked = {**c, "state": self._fin_sent, "snd_nxt": (c["snd_nxt"] + 1) & 0xFFFFFFFF,
                          "last_seen_ns": now}
                try:
                    self._conns.update(key, self._abi.pack("struct fs_conn", marked), UpdateFlags.EXIST)
                except (KeyError, OSError):
                    continue  # gone meanwhile (closed, reset)
            try:  # c is from before the mark: its snd_nxt is the FIN's sequence number
                self._send_fin(self._abi.unpack("struct fs_tuple", key), c, now)
            except OSError as exc:
                log.debug("keep-alive close failed: %s", exc)
                continue
            closed += 1
        return closed

    def _send_fin(self, t: dict[str, Any], c: dict[str, Any], now_ns: int) -> None:
        family = t["family"]
        words = 1 if family == 4 else 4
        # struct fs_tuple holds the addresses' network-order bytes read as host-order words
        client = b"".join(w.to_bytes(4, sys.byteorder) for w in t["client_addr"][:words])
        server = b"".join(w.to_bytes(4, sys.byteorder) for w in t["server_addr"][:words])
        ts = None
        if c["flags"] & self._tstamp:
            ts = ((now_ns // 1_000_000) & 0xFFFFFFFF, c["ts_recent"])
        window = OUR_WINDOW >> (c["rcv_wscale"] if c["flags"] & self._wscale else 0)
        packet = fin_packet(family, server, client, socket.ntohs(t["server_port"]),
                            socket.ntohs(t["client_port"]), c["snd_nxt"], c["rcv_nxt"], window, ts)
        dest = socket.inet_ntop(socket.AF_INET if family == 4 else socket.AF_INET6, client)
        self._socket(family).sendto(packet, (dest, 0))

    def close(self) -> None:
        for s in self._sockets.values():
            s.close()
        self._sockets.clear()
