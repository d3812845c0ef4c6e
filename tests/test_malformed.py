"""1,000 seeded random malformed requests: the server answers each with a clean HTTP error (or
nothing), never crashes, hangs or leaks a traceback, and afterwards still serves correctly with
the same worker processes.

Runs against both paths through test_http's `server` fixture (ids "user" and "kernel").
"""

from __future__ import annotations

import random
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor


from test_http import Conn, Server, docroot, fetch, req, server  # noqa: F401  (fixtures)

SEED = 20251125
COUNT = 1000
PARALLEL = 16
READ_TIMEOUT = 0.5  # per request: an incomplete request legitimately gets no answer
TIME_BUDGET = 60.0
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")

VALID = [
    req("/small.txt"),
    req("/f1k.bin", "HEAD"),
    req("/sub/", headers={"Range": "bytes=0-3", "Accept-Encoding": "gzip"}),
    req("/app.js", headers={"If-None-Match": '"x"', "Accept-Encoding": "br"}),
    req("/big.bin", headers={"Range": "bytes=0-1,5-9"}),
]
NASTY = [b"\x00", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x7f", b"\xff", b"%", b"%00",
         b"/..", b"\x1b", b"\"", b",", b"HTTP/1.1", b"\r\n\r\n"]


def mutated(rng: random.Random) -> bytes:
    data = bytearray(rng.choice(VALID))
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(5)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = rng.choice(NASTY)
        elif op == 2:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            data[pos:pos] = data[pos:pos + rng.randint(1, 20)]
        else:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return bytes(data)


def bad_request_line(rng: random.Random) -> bytes:
    method = rng.choice([b"GET", b"get", b"G\x00T", b"", b"GETT", b"FOO", b"\xff\xfe",
                         b"GET GET", b"POST", b"CONNECT"])
    target = rng.choice([b"/", b"", b"*", b"small.txt", b"/a b", b"/\x00", b"http://", b"//x",
                         b"/%", b"/%zz", b"/\x7f", b"/" + b"x" * rng.randint(1, 20000)])
    version = rng.choice([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1", b"HTTP/11",
                          b"http/1.1", b"HTTP/1.1 extra", b"", b"HTTP/0.9", b"HTTP/1.1\x00"])
    sep = rng.choice([b" ", b"  ", b"\t", b""])
    end = rng.choice([b"\r\n", b"\n", b"\r", b""])
    return method + sep + target + sep + version + end + b"Host: a\r\n\r\n"


def bad_header(rng: random.Random) -> bytes:
    line = rng.choice([b"NoColon", b"Sp ace: x", b": empty-name", b"X:\x00nul", b"X: a\rb",
                       b" leading-space: x", b"X-\xff: y", b"Host", b"Content-Length: abc",
                       b"Content-Length: 1e3", b"Content-Length: 99999999999999999999999",
                       b"Transfer-Encoding: chunked, identity", b"Range: bytes=\xff",
                       b"If-None-Match: \x00", b"Expect: 100-continue", b"Upgrade: h2c",
                       b"Connection: Upgrade, close"])
    return b"GET /small.txt HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n"


def huge_header(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nX-Big: "
                + b"v" * rng.randint(8000, 70000) + b"\r\n\r\n")
    n = rng.randint(50, 400)
    return (b"GET /small.txt HTTP/1.1\r\nHost: a\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * rng.randint(1, 200)) for i in range(n))
            + b"\r\n")


def cl_te_conflict(rng: random.Random) -> bytes:
    return rng.choice([
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\nabcd",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab\r\n0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
        b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ])


def truncated(rng: random.Random) -> bytes:
    data = rng.choice(VALID)
    return data[:rng.randrange(1, len(data) - 1)]


def garbage(rng: random.Random) -> bytes:
    return bytes(rng.randrange(256) for _ in range(rng.randint(1, 3000)))


GENERATORS = [mutated, mutated, mutated, bad_request_line, bad_header, huge_header,
              cl_te_conflict, truncated, garbage]


def cases() -> list[tuple[bytes, bool, bool]]:
    """(bytes, after a valid request on the same connection, half-close after sending)."""
    rng = random.Random(SEED)
    return [(rng.choice(GENERATORS)(rng), rng.random() < 0.3, rng.random() < 0.3)
            for _ in range(COUNT)]


def run_case(port: int, data: bytes, reuse: bool, half_close: bool) -> bytes:
    """Send one malformed request; everything the server sent back (until close or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if reuse:  # a malformed request on a connection that already served one
            s.sendall(req("/empty.txt"))
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += s.recv(1)
            assert head.startswith(b"HTTP/1.1 200 ")
        try:
            s.sendall(data)
            if half_close:
                s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""  # the server answered and closed before we finished sending
        s.settimeout(READ_TIMEOUT)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return out


def check_answers(raw: bytes, data: bytes) -> None:
    """Whatever came back is a sequence of well-formed HTTP/1.1 answers, never a 500."""
    pos = 0
    while pos < len(raw):
        m = STATUS_LINE.match(raw, pos)
        assert m, f"not an HTTP answer at {pos}: {raw[pos:pos + 80]!r} (request {data[:120]!r})"
        status = int(m.group(1))
        assert status != 500, f"server error for {data[:200]!r}"
        end = raw.find(b"\r\n\r\n", pos)
        if end < 0:
            return  # cut by our read timeout
        head = raw[pos:end]
        lm = re.search(rb"\r\nContent-Length: (\d+)", head)
        if status == 304 or lm is None:
            pos = end + 4
            continue
        pos = end + 4 + int(lm.group(1))
        if b"HEAD " in data[:64] and data.startswith(b"HEAD"):
            return  # a HEAD answer's length describes a body that is not there


def test_malformed_requests_never_break_the_server(server: Server):  # noqa: F811
    before = server.workers()
    assert before, "no worker processes found"
    work = cases()
    start = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda c: run_case(server.port, *c), work))
    elapsed = time.monotonic() - start
    for (data, _, _), raw in zip(work, results):
        check_answers(raw, data)
    answered = sum(1 for raw in results if raw)
    statuses = sorted({int(raw[9:12]) for raw in results if raw[:9] == b"HTTP/1.1 "})
    print(f"{COUNT} malformed requests in {elapsed:.1f} s; {answered} answered; statuses {statuses}")
    assert elapsed < TIME_BUDGET
    assert 400 in statuses and 431 in statuses
    # still correct afterwards, on fresh and on keep-alive connections, by the same workers
    body = (server.docroot / "f1k.bin").read_bytes()
    for _ in range(10):
        resp = fetch(server.port, "/f1k.bin")
        assert resp.status == 200 and resp.body == body
    with Conn(server.port) as c:
        c.send(req("/f1k.bin") + req("/small.txt"))
        assert c.read_response().body == body
        assert c.read_response().body == (server.docroot / "small.txt").read_bytes()
    assert server.workers() == before, "a worker died (and was restarted) during the run"
