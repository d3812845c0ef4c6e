"""The kernel fast path across the TCP options, MSS values and MTUs clients really use.

One `fsctl up` on the host end of a veth pair; clients in the namespace at the other end. Each
case sets the device MTU on both ends and the client's TCP options (the per-namespace sysctls
tcp_timestamps, tcp_sack and tcp_window_scaling, which govern IPv6 too, and TCP_MAXSEG before
connect), then fetches over IPv4 or IPv6: files of 0 and 1 bytes, one whose answer is exactly the
one-segment payload of that case and one a byte over (keep-alive and `Connection: close`), 16, 64
and 256 KiB (the kernel cache's per-file limit), GET and HEAD, an If-None-Match 304, and 256 KiB
again to a client whose receive buffer is 2 KiB. Checked for each case:

- every answer's head is the one user space builds (response.file_head, Date aside) and its body
  is the file's bytes, with no timeout;
- the kernel's counters say the kernel answered every request, with no hand-off;
- the SYN-ACK offers our device's MSS;
- no segment the server sent (captured on the host end with an ETH_P_ALL packet socket, which
  sees outgoing frames, ours included, and incoming ones before TC) is larger than the MTU, and
  none carries more than the MSS of the client's SYN (data and options, RFC 6691).

Jumbo MTUs on a veth rule out native XDP (it caps the peer's MTU near a page), so the server
starts with the link at 65,535 and runs generic XDP; each case then sets its MTUs, which the
program reads per SYN. A case's frames on the port are kept as case.pcap in its tmp_path
(`tcpdump -r`) to look at when it fails.

The cases are a covering subset of the cross product: each MTU, each option off (alone or all
together), each MSS, both families, and clients whose MTU is larger than ours appear, rather
than every combination.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fileserver_ctl import response
from test_prog import tcp_options
from test_veth import Link, Running, delta, fsctl_up, handoffs, link, no_offloads

pytestmark = pytest.mark.bpf

MTIME = 784111777  # every file's mtime, so a head's length settles once its size does
DATE_LEN = 29
SYN_MSS_TABLE = (536, 1220, 1360, 1400, 1440, 1460, 8940, 65476)  # bpf/cookie.bpf.h
FRAME_MAX = 14 + 20 + 20 + 12 + 15998  # bpf_skb_change_tail's frame limit (KERNEL-NOTES)
TS_OPT_LEN = 12
CLOSE_EXTRA = len("Connection: close\r\n")
VETH_MAX_MTU = 65535  # veth refuses 65536
CASE_SECONDS = 30  # one case's client run, whatever the server does
SOCKET_TIMEOUT = 5.0
RCVBUF = 2048
FIXED = {"empty.bin": b"", "one.bin": b"1", "k16.bin": os.urandom(16 << 10),
         "k64.bin": os.urandom(64 << 10), "k256.bin": os.urandom(256 << 10)}
ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Case:
    family: int
    mtu: int
    timestamps: bool = True
    sack: bool = True
    wscale: bool = True
    mss: int = 0  # TCP_MAXSEG before connect; 0: the device's
    peer_mtu: int = 0  # the client's end, when not `mtu` (a path whose far side is larger)

    @property
    def ip_len(self) -> int:
        return 20 if self.family == 4 else 40

    @property
    def client_mtu(self) -> int:
        return self.peer_mtu or self.mtu

    @property
    def syn_mss(self) -> int:
        """The MSS the client's SYN offers: TCP_MAXSEG caps its device's."""
        device = self.client_mtu - self.ip_len - 20
        return min(self.mss, device) if self.mss else device

    @property
    def synack_mss(self) -> int:
        """The MSS our SYN-ACK offers: our device's."""
        return min(self.mtu - self.ip_len - 20, 65495)

    @property
    def segment(self) -> int:
        """Payload of one kernel segment: the cookie's MSS (the table's largest not above the
        client's), our device's MTU, less the timestamp option, within one skb frame."""
        mss = max([m for m in SYN_MSS_TABLE if m <= self.syn_mss] or [SYN_MSS_TABLE[0]])
        opt = TS_OPT_LEN if self.timestamps else 0
        size = min(mss, self.mtu - self.ip_len - 20) - opt
        return min(size, FRAME_MAX - 14 - self.ip_len - 20 - opt)

    @property
    def kernel_stack(self) -> bool:
        """The SYN goes to the kernel's TCP: an IPv6 MSS under IPv6's minimum 1220."""
        return self.family == 6 and self.syn_mss < 1220

    @property
    def id(self) -> str:
        off = [name for name, on in (("ts", self.timestamps), ("sack", self.sack), ("ws", self.wscale))
               if not on]
        return (f"ipv{self.family}-mtu{self.mtu}" + (f"-client-mtu{self.peer_mtu}" if self.peer_mtu else "")
                + (f"-mss{self.mss}" if self.mss else "")
                + ("-no-" + "-".join(off) if off else ""))


# Every case also fetches 256 KiB with SO_RCVBUF 2048. Regression: with an MSS of 1220 or more
# (generic XDP: the request skbs we rewrite into segments are a page each) that client learned a
# payload/truesize ratio leaving it under one MSS of window for good, and the answer stalled.
CASES = [
    Case(4, 1500),
    Case(6, 1500),
    Case(4, 1500, timestamps=False),
    Case(6, 1500, sack=False),
    Case(4, 1500, wscale=False),
    Case(6, 1500, timestamps=False, sack=False, wscale=False),
    Case(4, 1500, mss=536),
    Case(4, 1500, mss=536, timestamps=False, sack=False, wscale=False),
    Case(6, 1500, mss=1220),
    Case(6, 1500, mss=536),  # the kernel's TCP serves it: bytes and sizes checked all the same
    Case(4, 1500, mss=1460),
    # regression: at MTU 1280 the SYN-ACK offered MSS 536, and our device's MTU was not applied
    # to the segment size, so a client with a larger MTU got frames over ours
    Case(4, 1280),
    Case(6, 1280, timestamps=False),
    Case(4, 1280, peer_mtu=1500),
    Case(6, 1280, peer_mtu=9000),
    Case(4, 1500, peer_mtu=9000, wscale=False),
    Case(4, 9000, sack=False),
    Case(6, 9000, wscale=False),
    Case(4, 9000, mss=1220, timestamps=False),
    Case(6, 9000, mss=1460),
    Case(4, VETH_MAX_MTU),
    Case(6, VETH_MAX_MTU, timestamps=False),
]


def fit_files(root: Path, segment: int) -> dict[str, int]:
    """Files whose keep-alive and close answers are exactly `segment` payload bytes and one byte
    over: name -> the answer length it was fitted to."""
    fitted = {}
    for close in (False, True):
        for extra in (0, 1):
            name = f"s{segment}-{'close' if close else 'ka'}-{'over' if extra else 'at'}.bin"
            path = root / name
            target = segment + extra
            size = target
            for _ in range(4):  # Content-Length and the ETag depend on the size: settle it
                path.write_bytes(b"x" * max(size, 0))
                os.utime(path, (MTIME, MTIME))
                head = response.file_head(200, path.stat(), path, "D" * DATE_LEN, close=close)
                size = target - len(head)
            assert size >= 0 and path.stat().st_size == size, f"{name} does not settle"
            fitted[name] = target
    return fitted


def expected_head(root: Path, name: str, status: int, date: str, close: bool) -> bytes:
    path = root / name
    return response.file_head(status, path.stat(), path, date, close=close)


# --- the client (runs in the namespace) ---------------------------------------------------------

# One JSON job on stdin: sessions of requests on one connection each; per answer the raw head and
# the body's length and SHA-256. Every socket has a timeout.
TESTS = Path(__file__).resolve().parent  # CLIENT's working directory: `import wire`
CLIENT = r'''
import hashlib, json, socket, sys, time
from wire import connect, read_answer
job = json.load(sys.stdin)

def session(s):
    out = []
    try:
        sock = connect(job["host"], job["port"], job["timeout"], job["mss"], s.get("rcvbuf", 0))
    except OSError as e:
        return [{"error": f"connect: {e}"}]
    with sock:
        buf = b""
        for method, path, close, inm in s["requests"]:
            req = f"{method} {path} HTTP/1.1\r\nHost: matrix\r\n"
            if inm:
                req += f"If-None-Match: {inm}\r\n"
            if close:
                req += "Connection: close\r\n"
            started = time.monotonic()
            try:
                sock.sendall((req + "\r\n").encode())
                head, _, _, body, buf = read_answer(sock, buf, head_only=method == "HEAD")
                if close and sock.recv(1):
                    raise ConnectionError("bytes after a Connection: close answer")
            except (OSError, ValueError) as e:
                out.append({"path": path, "error": f"{type(e).__name__}: {e}"})
                return out
            out.append({"path": path, "head": head.decode("latin-1"), "length": len(body),
                        "sha256": hashlib.sha256(body).hexdigest(),
                        "seconds": round(time.monotonic() - started, 3)})
    return out

json.dump([session(s) for s in job["sessions"]], sys.stdout)
'''


# --- the capture ----------------------------------------------------------------------------------

@dataclass
class Capture:
    """Frames on the host end of the link: the client SYNs' MSS options by client port, and each
    segment from the server port as (client port, IP packet length, TCP options length, data
    length)."""

    ifname: str
    port: int
    syn_mss: dict[int, int] = field(default_factory=dict)
    syn_order: list[int] = field(default_factory=list)  # client ports, first SYN first
    synack_mss: set[int] = field(default_factory=set)
    frames: list[tuple[float, bytes]] = field(default_factory=list)  # the port's, for a pcap
    sent: list[tuple[int, int, int, int]] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Capture:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: a burst must not drop
        sock.bind((self.ifname, ETH_P_ALL))
        sock.settimeout(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # the last frames of the case
        self._stop.set()
        assert self._thread is not None and self._sock is not None
        self._thread.join(5)
        self._sock.close()

    def _read(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                frame, addr = self._sock.recvfrom(1 << 17)
            except TimeoutError:
                continue
            except OSError:
                return
            self._parse(frame, addr[2] == PACKET_OUTGOING)

    def _parse(self, frame: bytes, outgoing: bool) -> None:
        if len(frame) < 14:
            return
        ethertype = struct.unpack_from("!H", frame, 12)[0]
        if ethertype == 0x0800 and len(frame) >= 34 and frame[23] == 6:
            ip_len = struct.unpack_from("!H", frame, 16)[0]
            tcp = 14 + (frame[14] & 0xF) * 4
        elif ethertype == 0x86DD and len(frame) >= 54 and frame[20] == 6:
            ip_len = 40 + struct.unpack_from("!H", frame, 18)[0]
            tcp = 54
        else:
            return
        if len(frame) < tcp + 20:
            return
        sport, dport = struct.unpack_from("!HH", frame, tcp)
        doff = (frame[tcp + 12] >> 4) * 4
        flags = frame[tcp + 13]
        data = 14 + ip_len - tcp - doff
        if self.port in (sport, dport):
            self.frames.append((time.time(), frame[:tcp + doff]))
        if outgoing and sport == self.port and flags & 0x12 == 0x12:
            self.synack_mss.add(tcp_mss_option(frame[tcp + 20:tcp + doff]))
        if outgoing and sport == self.port:
            self.sent.append((dport, ip_len, doff - 20, data))
        elif not outgoing and dport == self.port and flags & 0x12 == 0x02:
            if sport not in self.syn_mss:
                self.syn_order.append(sport)
            self.syn_mss[sport] = tcp_mss_option(frame[tcp + 20:tcp + doff])


    def write_pcap(self, path: Path) -> None:
        """The port's frames (headers only) as a pcap file, to read with tcpdump -r."""
        with path.open("wb") as f:
            f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
            for ts, frame in self.frames:
                f.write(struct.pack("<IIII", int(ts), int(ts % 1 * 1e6), len(frame), len(frame)) + frame)


def tcp_mss_option(opts: bytes) -> int:
    mss = tcp_options(opts).get(2, b"")
    return struct.unpack("!H", mss)[0] if len(mss) == 2 else 0


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docroot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, int]]]:
    root = tmp_path_factory.mktemp("matrix-www")
    for name, data in FIXED.items():
        (root / name).write_bytes(data)
        os.utime(root / name, (MTIME, MTIME))
    fitted = {case.segment: {} for case in CASES}
    for segment in fitted:
        fitted[segment] = fit_files(root, segment)
    return root, fitted


@pytest.fixture(scope="module")
def lk() -> Iterator[Link]:
    with link() as created:
        no_offloads(created)  # kernel-stack segments reach the capture as they go on the wire
        # native XDP on a veth caps its peer's MTU near a page: jumbo frames mean generic XDP,
        # which `fsctl up` falls back to when the MTU is already large
        configure(created, Case(4, VETH_MAX_MTU))
        yield created


@pytest.fixture(scope="module")
def served(lk: Link, docroot: tuple[Path, dict], real_bpf_object: Path) -> Iterator[Running]:
    with fsctl_up(lk, docroot[0]) as running:
        yield running


def configure(lk: Link, case: Case) -> None:
    """The case's MTU on both ends and the client namespace's TCP options."""
    pair = lk.pair
    pair.run_in(["ip", "link", "set", pair.peer_if, "mtu", str(case.client_mtu)])
    subprocess.run(["ip", "link", "set", pair.host_if, "mtu", str(case.mtu)], check=True, timeout=10)
    for name, on in (("tcp_timestamps", case.timestamps), ("tcp_sack", case.sack),
                     ("tcp_window_scaling", case.wscale)):
        pair.run_in(["sysctl", "-qw", f"net.ipv4.{name}={int(on)}"])


def requests_of(case: Case, root: Path, fitted: dict[str, int]) -> list[dict]:
    """The case's sessions: (method, path, close, If-None-Match) per request."""
    etag = response.etag((root / "k16.bin").stat())
    etag1 = response.etag((root / "one.bin").stat())
    edge = sorted(fitted)
    keep_alive = [("GET", "/empty.bin", False, ""), ("GET", "/one.bin", False, ""),
                  *[("GET", f"/{n}", False, "") for n in edge if "-ka-" in n],
                  ("HEAD", "/k64.bin", False, ""), ("GET", "/k16.bin", False, ""),
                  ("GET", "/k16.bin", False, etag), ("HEAD", "/k16.bin", False, etag),
                  ("GET", "/k64.bin", False, ""), ("GET", "/k256.bin", False, "")]
    sessions = [{"requests": keep_alive}]
    sessions += [{"requests": [("GET", f"/{n}", True, "")]} for n in edge if "-close-" in n]
    sessions += [{"requests": [("GET", "/empty.bin", True, "")]},
                 {"requests": [("HEAD", "/k256.bin", True, "")]},
                 {"requests": [("GET", "/one.bin", True, etag1)]},
                 {"requests": [("GET", "/k256.bin", True, "")]},
                 {"requests": [("GET", "/k256.bin", False, ""), ("GET", "/k64.bin", True, "")],
                  "rcvbuf": RCVBUF}]
    return sessions


# --- the matrix ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_answers_exactly_within_mtu_and_mss(served: Running, lk: Link,
                                                   docroot: tuple[Path, dict], case: Case,
                                                   tmp_path: Path) -> None:
    root, fitted_by_segment = docroot
    fitted = fitted_by_segment[case.segment]
    configure(lk, case)
    sessions = requests_of(case, root, fitted)
    job = {"host": lk.addr(case.family), "port": served.port, "mss": case.mss, "timeout": SOCKET_TIMEOUT,
           "sessions": sessions}
    before = served.counters()
    with Capture(lk.pair.host_if, served.port) as cap:
        done = lk.pair.run_in([sys.executable, "-c", CLIENT], input=json.dumps(job), capture_output=True,
                              text=True, timeout=CASE_SECONDS, check=False, cwd=TESTS)  # CLIENT imports wire
    moved = delta(before, served.counters())
    cap.write_pcap(tmp_path / "case.pcap")  # headers of everything on the port: tcpdump -r
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)

    # the bytes: user space's head (Date aside), the file's body
    errors = [(i, r) for i, s in enumerate(results) for r in s if "error" in r]
    assert errors == [], f"counters moved: {moved}"
    for session, got in zip(sessions, results):
        assert len(got) == len(session["requests"])
        for (method, path, close, inm), r in zip(session["requests"], got):
            name = path.lstrip("/")
            status = 304 if inm else 200
            date = r["head"].split("\r\nDate: ", 1)[1][:DATE_LEN]
            assert r["head"] == expected_head(root, name, status, date, close).decode("latin-1"), path
            body = b"" if method == "HEAD" or status == 304 else (root / name).read_bytes()
            assert (r["length"], r["sha256"]) == (len(body), hashlib.sha256(body).hexdigest()), path

    # the kernel answered every request itself (or, for an odd SYN, left all to the kernel's TCP)
    requests = sum(len(s["requests"]) for s in sessions)
    assert handoffs(moved) == {}
    assert moved.get("errors", 0) == 0
    if case.kernel_stack:
        assert moved.get("syn_passed", 0) == len(sessions) and moved.get("responses", 0) == 0
    else:
        assert moved.get("syn_answered", 0) == len(sessions)
        assert moved.get("responses", 0) == requests

    # every segment within the MTU and the client's MSS
    ports = {p for p, *_ in cap.sent}
    assert len(ports) == len(sessions), f"captured {len(ports)} connections"
    assert set(cap.syn_mss.values()) == {case.syn_mss}
    assert cap.synack_mss == {case.synack_mss} or case.kernel_stack
    too_big = [(p, ip, opt, data) for p, ip, opt, data in cap.sent
               if ip > case.mtu or (data and data + opt > cap.syn_mss.get(p, 0))]
    assert too_big == [], f"MTU {case.mtu}, MSS {case.syn_mss}: (port, IP length, options, data)"
    if case.kernel_stack:
        return
    largest = max(data for *_, data in cap.sent)
    assert largest == case.segment, f"largest segment {largest}, expected {case.segment}"

    # the one-segment limit: a close answer fitted to it is one segment, a byte over is two
    assert len(cap.syn_order) == len(sessions)
    for session, port in zip(sessions, cap.syn_order):
        (method, path, close, inm), *more = session["requests"]
        if "-close-" in path:
            segments = [data for p, _, _, data in cap.sent if p == port and data]
            assert len(segments) == (2 if path.endswith("-over.bin") else 1), (path, segments)
