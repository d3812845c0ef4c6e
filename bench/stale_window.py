#!/usr/bin/env python3
"""How long the kernel cache can answer old bytes after a file changes: the stale window.

`fsctl up` serves a docroot on lo; one file in it is cached, and a writer changes it again and
again in every way issue 5 lists: written in place (O_TRUNC + write, or pwrite over the same
length), truncated, replaced by an atomic rename, deleted and created again, made unreadable
(chmod 000) and readable again. After each change it waits (up to REFILL_WAIT) until the
kernel caches the file again, so the next change hits a cached file. Meanwhile clients read the
file without pause, on a keep-alive connection (a fresh one every KEEPALIVE_REQUESTS requests,
since a handed-off connection stays with user space) and on a new connection per request.

A response is stale when its bytes are older than the last change completed before the request
was sent: it matches an earlier state of the file and none since. Requests sent while a change
was under way may get either side of it. For each change the window is how long after it
completed a request could still be sent and get older bytes (0 when none did); windows are
reported per kind of change: in place (writes, truncations), replaced (renames, deletes, a new
file), and unreadable (chmod: the kernel's own answer counter must not move while the file is
unreadable, since user space running as root may still answer 200 with the same bytes).

Each reader is a process of its own sending at most one request every PACE_NS, each
connection from a loopback address of its own (see _source_address).

    sudo .venv/bin/python bench/stale_window.py [--changes 1000] [--port 18560]

STALE_WINDOW_DEBUG=1 prints every stale or unmatched response and every client error.
tests/test_coherence.py runs the same measurement and asserts on it.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import multiprocessing
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fileserver_ctl import config, libbpf  # noqa: E402
from harness import start_fsctl  # noqa: E402

NAME = "f.bin"
START_TIMEOUT = 30.0
REFILL_WAIT = 0.3  # seconds to wait for the kernel to cache the file again after a change
KERNEL_ANSWERS = 3  # then until the kernel has answered this many requests from it...
SERVE_WAIT = 0.03  # ...or this many seconds have passed
DWELL = 0.01  # seconds a state that cannot be cached (deleted, unreadable) is held
KEEPALIVE_REQUESTS = 20  # requests per keep-alive connection before a fresh one
REPLY_TIMEOUT = 1.0
# a reader sends a request at most this often: flat out, two readers take both cores of a small
# machine from the server's own user space (which refills the cache) and from the writer
PACE_NS = 250_000  # seconds a client waits for a response before counting an error
# one round of changes; each is (name, kind); kinds are what the window is reported by
ROUND = (("write", "in place"), ("pwrite", "in place"), ("truncate", "in place"),
         ("rename", "replaced"), ("delete", "replaced"), ("create", "replaced"),
         ("chmod 000", "unreadable"), ("chmod 644", "unreadable"))
KINDS = ("in place", "replaced", "unreadable")


# --- the server ----------------------------------------------------------------------------

@dataclass
class Server:
    port: int
    docroot: Path
    proc: subprocess.Popen
    output: list[str]


@contextlib.contextmanager
def fsctl_up(port: int, docroot: Path, *args: str, timeout: float = START_TIMEOUT) -> Iterator[Server]:
    """`fsctl up` on lo serving docroot until the block ends (SIGTERM, then waited for)."""
    run = start_fsctl(["-p", str(port), "-d", str(docroot), "-i", "lo", *args], port, timeout=timeout)
    try:
        yield Server(port, docroot, run.proc, run.output)
    finally:
        run.stop()


class Pins:
    """The server's pinned maps: the kernel's answer counter and whether a path is cached."""

    def __init__(self, port: int) -> None:
        pins = config.pin_dir(port)
        self.abi = libbpf.Abi(config.ABI_HEADER)
        self.stats = libbpf.Map.from_pin(pins / "stats")
        self.cache = libbpf.Map.from_pin(pins / "file_cache")
        self.inodes = libbpf.Map.from_pin(pins / "cached_inodes")
        self._responses = self.abi.enum("fs_stat")["FS_STAT_RESPONSES"].to_bytes(4, "little")
        self._path_max = self.abi.const("FS_PATH_MAX")

    def responses(self) -> int:
        return sum(int.from_bytes(v[:8], "little") for v in self.stats[self._responses])

    def cached(self, key: str, st: os.stat_result) -> bool:
        """The kernel would answer `key` from the file whose stat is st (inode and size)."""
        try:
            e = self.abi.unpack("struct fs_entry", self.cache[key.encode().ljust(self._path_max, b"\0")])
        except KeyError:
            return False
        if e["ino"] != st.st_ino or e["body_len"] != st.st_size:
            return False
        inode = self.abi.pack("struct fs_inode_key", {"ino": e["ino"], "dev": e["dev"]})
        return inode in self.inodes

    def close(self) -> None:
        for m in (self.stats, self.cache, self.inodes):
            m.close()


# --- clients --------------------------------------------------------------------------------

@dataclass
class Reply:
    sent: int  # time.monotonic_ns() just before the request went out
    received: int
    status: int
    digest: int  # crc32 of the body: a million bodies would not fit in memory


def _read_reply(sock: socket.socket, buf: bytearray) -> tuple[int, bytes, bool]:
    """(status, body, server closes) of one response on sock; buf keeps what follows."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[:end]
    headers = {k.lower(): v for k, _, v in (line.partition(": ") for line in head[1:] if line)}
    length = int(headers.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside a body")
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return int(head[0].split(" ")[1]), body, headers.get("connection", "").lower() == "close"


def _source_address(rng: random.Random) -> str:
    """A loopback address of its own for each connection (any 127/8 address reaches lo), so
    no connection lands on a tuple an earlier one left in TIME_WAIT: the kernel path fails to
    hand such a connection off (see the report), which is not what this measures."""
    return f"127.{rng.randrange(1, 255)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"


def _read(port: int, keepalive: bool, stop: Any, out: Any, pace_ns: int = PACE_NS,
          source: str | None = None) -> None:
    """In a reader process: GET /NAME without pause until `stop` is set, then send the replies
    (four arrays: sent, received, status, crc32 of the body) and the error count through `out`.
    `source`: the client address (None: a random loopback address per connection)."""
    rng = random.Random()
    request = (f"GET /{NAME} HTTP/1.1\r\nHost: lo\r\n"
               + ("" if keepalive else "Connection: close\r\n") + "\r\n").encode()
    columns = [array.array("q") for _ in range(4)]
    sock, buf, used, errors, next_at = None, bytearray(), 0, 0, 0
    while not stop.is_set():
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT,
                                                source_address=(source or _source_address(rng), 0))
                buf.clear()
                used = 0
            wait = next_at - time.monotonic_ns()
            if wait > 0:
                time.sleep(wait / 1e9)
            sent = time.monotonic_ns()
            next_at = sent + pace_ns
            sock.sendall(request)
            status, body, closes = _read_reply(sock, buf)
            for column, value in zip(columns, (sent, time.monotonic_ns(), status, zlib.crc32(body))):
                column.append(value)
            used += 1
            if closes or not keepalive or used >= KEEPALIVE_REQUESTS:
                sock.close()
                sock = None
        except (OSError, ValueError, IndexError) as exc:
            errors += 1
            if os.environ.get("STALE_WINDOW_DEBUG"):
                print("reader", "keep-alive" if keepalive else "close", "error", repr(exc), "after", used,
                      "requests on the connection", sock.getsockname() if sock is not None else None,
                      file=sys.stderr)
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.001)
    if sock is not None:
        sock.close()
    for column in columns:
        out.send_bytes(column.tobytes())
    out.send(errors)


class Reader:
    """A process reading /NAME without pause (a process, so the writer's timing does not wait
    for the GIL): keep-alive (renewed every KEEPALIVE_REQUESTS requests) or a new connection
    per request."""

    def __init__(self, port: int, keepalive: bool, stop: Any, source: str | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process
        self._conn, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_read, args=(port, keepalive, stop, child, PACE_NS, source), daemon=True,
                                 name=f"reader-{'keepalive' if keepalive else 'close'}")
        self._child = child
        self.replies: list[Reply] = []
        self.errors = 0

    def start(self) -> None:
        self._proc.start()
        self._child.close()

    def join(self, timeout: float = 30) -> None:
        """Collect the replies once `stop` is set."""
        if not self._conn.poll(timeout):
            self._proc.kill()
            raise RuntimeError(f"{self._proc.name} did not finish")
        columns = []
        for _ in range(4):
            column = array.array("q")
            column.frombytes(self._conn.recv_bytes())
            columns.append(column)
        self.errors = self._conn.recv()
        self._proc.join(timeout)
        self.replies = [Reply(*row) for row in zip(*columns)]


# --- the writer -----------------------------------------------------------------------------

@dataclass
class State:
    """The file after a change: its bytes (None: deleted) and whether it is readable."""

    body: bytes | None
    readable: bool = True
    digest: int | None = None  # crc32 of the body, as the readers report it

    def __post_init__(self) -> None:
        if self.body is not None:
            self.digest = zlib.crc32(self.body)


@dataclass
class Change:
    name: str
    kind: str
    started: int  # time.monotonic_ns()
    done: int
    refilled: bool  # the kernel cached the file again afterwards (when it could)
    served: bool = False  # ...and answered from it before the next change
    kernel_while_unreadable: int = 0  # kernel answers from this change's end to the next's start


def version_body(n: int, size: int) -> bytes:
    """Bytes of version n: its number over and over, so any two versions differ."""
    stamp = f"<{n:07d}>".encode()
    return (stamp * (size // len(stamp) + 1))[:size]


class Writer:
    """Changes docroot/NAME in ROUND order; `states[i + 1]` is the file after change i."""

    def __init__(self, docroot: Path, pins: Pins, seed_size: int = 2000) -> None:
        self.path = docroot / NAME
        self.tmp = docroot / f".{NAME}.tmp"  # hidden: never served, never cached
        self.pins = pins
        self.version = 0
        self.states = [State(version_body(0, seed_size))]
        self.changes: list[Change] = []
        self.sizes = [900, 1500, 2500, 3900]
        self._unreadable_from = 0  # kernel answer count when the file was made unreadable

    def _next_body(self, size: int | None = None) -> bytes:
        self.version += 1
        return version_body(self.version, size or self.sizes[self.version % len(self.sizes)])

    def apply(self, name: str) -> State:
        """Make one change; returns the state it leaves."""
        cur = self.states[-1]
        if name == "write":
            body = self._next_body()
            fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, body)
            finally:
                os.close(fd)
            return State(body)
        if name == "pwrite":  # same length, new bytes, no truncation
            body = self._next_body(len(cur.body))
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.pwrite(fd, body, 0)
            finally:
                os.close(fd)
            return State(body)
        if name == "truncate":
            size = max(len(cur.body) // 2, 1)
            os.truncate(self.path, size)
            return State(cur.body[:size])
        if name in ("rename", "create"):
            body = self._next_body()
            if name == "create":
                self.path.write_bytes(body)
                return State(body)
            self.tmp.write_bytes(body)
            os.rename(self.tmp, self.path)
            return State(body)
        if name == "delete":
            os.unlink(self.path)
            return State(None)
        if name == "chmod 000":
            os.chmod(self.path, 0)
            return State(cur.body, readable=False)
        if name == "chmod 644":
            os.chmod(self.path, 0o644)
            return State(cur.body)
        raise ValueError(name)

    def run(self, count: int, stop: Any) -> None:
        """`count` changes in ROUND order, each followed by waiting for the kernel to cache the
        file again (or DWELL for a state it cannot cache)."""
        self.path.write_bytes(self.states[0].body)
        os.chmod(self.path, 0o644)
        self.wait_cached(REFILL_WAIT * 10)
        for i in range(count):
            if stop.is_set():
                break
            name, kind = ROUND[i % len(ROUND)]
            before_kernel = self.pins.responses()
            if self.changes and self.changes[-1].name == "chmod 000":
                self.changes[-1].kernel_while_unreadable = before_kernel - self._unreadable_from
            started = time.monotonic_ns()
            state = self.apply(name)
            done = time.monotonic_ns()
            if name == "chmod 000":
                self._unreadable_from = self.pins.responses()
            self.states.append(state)
            cacheable = state.body is not None and state.readable
            refilled = self.wait_cached(REFILL_WAIT) if cacheable else False
            served = refilled and self.wait_answers(KERNEL_ANSWERS, SERVE_WAIT)
            if not cacheable:
                time.sleep(DWELL)
            self.changes.append(Change(name, kind, started, done, refilled, served))

    def wait_answers(self, count: int, timeout: float) -> bool:
        """Wait until the kernel has answered `count` more requests (or timeout); True when it
        answered any."""
        deadline, start = time.monotonic() + timeout, self.pins.responses()
        while time.monotonic() < deadline and self.pins.responses() < start + count:
            time.sleep(0.001)
        return self.pins.responses() > start

    def wait_cached(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        st = os.stat(self.path)
        while time.monotonic() < deadline:
            if self.pins.cached("/" + NAME, st):
                return True
            time.sleep(0.002)
        return False


# --- judging --------------------------------------------------------------------------------

def _matches(state: State, reply: Reply) -> bool:
    if state.body is None:
        return reply.status == 404
    if reply.status == 200:
        return reply.digest == state.digest
    return not state.readable and reply.status in (403, 404)


@dataclass
class Result:
    changes: int
    replies: int
    kernel_replies: int
    refilled: int  # changes after which the kernel cached the file again
    served: int  # ...and answered from it before the next change
    cacheable: int  # changes that left a cacheable file
    errors: int
    stale: dict[str, int] = field(default_factory=dict)  # kind -> stale replies
    torn: int = 0  # replies matching no state at all (read while a change was under way)
    windows: dict[str, list[float]] = field(default_factory=dict)  # kind -> window per change, ms
    kernel_while_unreadable: int = 0

    def percentile(self, kind: str, q: float) -> float:
        w = sorted(self.windows.get(kind, []))
        return w[min(int(q * len(w)), len(w) - 1)] if w else 0.0

    def report(self) -> str:
        lines = [f"{self.changes} changes, {self.replies} responses "
                 f"({self.kernel_replies} from the kernel), {self.errors} client errors; "
                 f"of {self.cacheable} changes that left the file cacheable, the kernel cached it again "
                 f"after {self.refilled} and answered from it before the next change after {self.served}"]
        for kind in KINDS:
            n = len(self.windows.get(kind, []))
            worst = max(self.windows.get(kind, [0.0]), default=0.0)
            lines.append(f"  {kind:<10} {n:4d} changes  stale responses {self.stale.get(kind, 0):5d}  "
                         f"window p50 {self.percentile(kind, 0.5):.3f} ms  "
                         f"p99 {self.percentile(kind, 0.99):.3f} ms  max {worst:.3f} ms")
        lines.append(f"  kernel answers while the file was unreadable: {self.kernel_while_unreadable}")
        lines.append(f"  responses matching no state (read while a change was under way): {self.torn}")
        return "\n".join(lines)


def judge(writer: Writer, replies: list[Reply], kernel_replies: int, errors: int) -> Result:
    changes = writer.changes
    dones = [c.done for c in changes]
    starts = [c.started for c in changes]
    stale = dict.fromkeys(KINDS, 0)
    worst = [0.0] * len(changes)  # per change: latest stale request after it completed, ms
    torn = 0
    for r in replies:
        last = bisect.bisect_left(dones, r.sent)  # changes completed before it was sent
        upto = bisect.bisect_left(starts, r.received)  # changes begun before it came back
        states = writer.states
        if any(_matches(states[s], r) for s in range(last, min(upto, len(changes)) + 1)):
            continue
        if not any(_matches(states[s], r) for s in range(last)):
            torn += 1
            if os.environ.get("STALE_WINDOW_DEBUG"):
                print("torn", r.status, "after", changes[last - 1].name if last else None,
                      "during", [c.name for c in changes[last:upto]], file=sys.stderr)
            continue
        change = last - 1  # older bytes than what this change left
        if os.environ.get("STALE_WINDOW_DEBUG"):
            older = max(s for s in range(last) if _matches(states[s], r))
            print("stale", r.status, "state", older, "of", last,
                  "after", [c.name for c in changes[max(older - 1, 0):last]],
                  f"sent {(r.sent - changes[change].done) / 1e6:.3f} ms after (at {r.sent} ns),",
                  f"took {(r.received - r.sent) / 1e6:.3f} ms", file=sys.stderr)
        stale[changes[change].kind] += 1
        worst[change] = max(worst[change], (r.sent - changes[change].done) / 1e6)
    windows: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for c, w in zip(changes, worst):
        windows[c.kind].append(w)
    cacheable = [c for c, s in zip(changes, writer.states[1:]) if s.body is not None and s.readable]
    return Result(changes=len(changes), replies=len(replies), kernel_replies=kernel_replies,
                  refilled=sum(c.refilled for c in cacheable), served=sum(c.served for c in cacheable),
                  cacheable=len(cacheable), errors=errors,
                  stale=stale, torn=torn, windows=windows,
                  kernel_while_unreadable=sum(c.kernel_while_unreadable for c in changes))


def measure(port: int, docroot: Path, changes: int, source: str | None = None) -> Result:
    """Run the writer and both readers against the server on `port` serving docroot; `source`:
    the clients' address (None: a random loopback address per connection)."""
    pins = Pins(port)
    try:
        writer = Writer(docroot, pins)
        stop = multiprocessing.get_context("spawn").Event()
        start_kernel = pins.responses()
        readers = [Reader(port, keepalive, stop, source) for keepalive in (True, False)]
        for r in readers:
            r.start()
        try:
            writer.run(changes, stop)
        finally:
            stop.set()
            for r in readers:
                r.join(timeout=10)
        kernel = pins.responses() - start_kernel
        replies = sorted((rep for r in readers for rep in r.replies), key=lambda rep: rep.sent)
        return judge(writer, replies, kernel, sum(r.errors for r in readers))
    finally:
        pins.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--port", type=int, default=18560)
    parser.add_argument("--source", metavar="ADDR",
                        help="one client address for every connection (default: a random 127/8 address each)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (fsctl up attaches BPF programs)", file=sys.stderr)
        return 2
    docroot = Path(tempfile.mkdtemp(prefix="stale-window-"))
    try:
        (docroot / NAME).write_bytes(version_body(0, 2000))
        with fsctl_up(args.port, docroot, "--workers", "2"):
            t0 = time.monotonic()
            result = measure(args.port, docroot, args.changes, args.source)
            took = time.monotonic() - t0
        print(f"stale window, fsctl up on lo port {args.port}, {took:.1f} s")
        print(result.report())
    finally:
        shutil.rmtree(docroot, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
