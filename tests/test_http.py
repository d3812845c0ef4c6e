"""HTTP behaviour of the file server, checked with raw sockets and exact bytes.

The pure header builder (response.py) is tested directly; everything else runs against a live
server through the `server` fixture, parametrised over both paths (ids "user" and "kernel") so
the kernel fast path must pass the very same assertions as the user-space server.
"""

from __future__ import annotations

import errno
import os
import re
import time
from pathlib import Path

import pytest

from fileserver_ctl import response


# --- response.py: the one header builder both paths use -------------------------------------

def test_http_date_is_imf_fixdate_of_fixed_width():
    assert response.http_date(0) == "Thu, 01 Jan 1970 00:00:00 GMT"
    assert response.http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    for ts in (0, 1e9, time.time(), 4102444800):
        assert len(response.http_date(ts)) == response.DATE_LEN


def test_etag_is_strong_and_follows_inode_size_and_mtime(tmp_path: Path):
    f = tmp_path / "f.txt"
    f.write_bytes(b"abc")
    st = os.stat(f)
    tag = response.etag(st)
    assert tag.startswith('"') and tag.endswith('"') and not tag.startswith("W/")
    assert tag == response.etag(os.stat(f))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert response.etag(os.stat(f)) != tag
    f.write_bytes(b"abcd")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert response.etag(os.stat(f)) != tag  # size differs
    g = tmp_path / "g.txt"
    g.write_bytes(b"abc")
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert response.etag(os.stat(g)) != tag  # inode differs


@pytest.mark.parametrize("name, expected", [
    ("index.html", "text/html; charset=utf-8"),
    ("INDEX.HTM", "text/html; charset=utf-8"),
    ("a.txt", "text/plain; charset=utf-8"),
    ("a.css", "text/css; charset=utf-8"),
    ("a.js", "text/javascript; charset=utf-8"),
    ("a.json", "application/json; charset=utf-8"),
    ("a.xml", "application/xml; charset=utf-8"),
    ("a.svg", "image/svg+xml; charset=utf-8"),
    ("a.png", "image/png"),
    ("a.wasm", "application/wasm"),
    ("noext", "application/octet-stream"),
    ("a.unknownext", "application/octet-stream"),
    ("a.tar.gz", "application/gzip"),
    ("a.gz", "application/gzip"),
])
def test_content_type_from_extension(name, expected):
    got = response.content_type(Path("/x") / name)
    if name == "a.js":  # older mimetypes tables say application/javascript
        assert got in (expected, "application/javascript; charset=utf-8")
    else:
        assert got == expected


def test_head_bytes_keeps_order_and_ends_with_blank_line():
    assert response.head_bytes(404, [("Server", "s"), ("Content-Length", "0")]) == (
        b"HTTP/1.1 404 Not Found\r\nServer: s\r\nContent-Length: 0\r\n\r\n")


def _stat_of(tmp_path: Path, name: str, data: bytes, mtime: int) -> tuple[Path, os.stat_result]:
    f = tmp_path / name
    f.write_bytes(data)
    os.utime(f, (mtime, mtime))
    return f, os.stat(f)


def test_file_head_200_exact_bytes(tmp_path: Path):
    f, st = _stat_of(tmp_path, "a.txt", b"hello", 784111777)
    date = response.http_date(1e9)
    tag = response.etag(st)
    expected = ("HTTP/1.1 200 OK\r\n"
                "Server: ebpf-fileserver\r\n"
                f"Date: {date}\r\n"
                "Content-Type: text/plain; charset=utf-8\r\n"
                "Content-Length: 5\r\n"
                "Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                f"ETag: {tag}\r\n"
                "Accept-Ranges: bytes\r\n"
                "\r\n").encode()
    assert response.file_head(200, st, f, date) == expected
    # HEAD announces the same fields, Content-Length included (RFC 9110 §9.3.2).
    assert response.file_head(200, st, f, date, head_only=True) == expected
    closing = response.file_head(200, st, f, date, close=True)
    assert closing == expected[:-2] + b"Connection: close\r\n\r\n"


def test_file_head_304_has_validators_but_no_length_or_type(tmp_path: Path):
    f, st = _stat_of(tmp_path, "a.txt", b"hello", 784111777)
    date = response.http_date(1e9)
    head = response.file_head(304, st, f, date, close=True)
    assert head == ("HTTP/1.1 304 Not Modified\r\n"
                    "Server: ebpf-fileserver\r\n"
                    f"Date: {date}\r\n"
                    "Last-Modified: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                    f"ETag: {response.etag(st)}\r\n"
                    "Connection: close\r\n"
                    "\r\n").encode()


def test_file_head_precompressed_variant(tmp_path: Path):
    _, st = _stat_of(tmp_path, "app.js.gz", b"\x1f\x8b...", 784111777)
    head = response.file_head(200, st, tmp_path / "app.js", "D" * 29,
                              content_encoding="gzip", vary=True, close=True).decode()
    lines = head.split("\r\n")
    assert lines[3].startswith("Content-Type: ") and "javascript" in lines[3]
    assert lines[4] == f"Content-Length: {st.st_size}"
    assert lines[-5:] == ["Content-Encoding: gzip", "Vary: Accept-Encoding",
                          "Connection: close", "", ""]



# --- http_semantics.py: the pure RFC 9110 rules ---------------------------------------------

from fileserver_ctl import http_semantics as sem


@pytest.mark.parametrize("path, expected", [
    ("/", ((), True)),
    ("/a/b.txt", (("a", "b.txt"), False)),
    ("/a//b/", (("a", "b"), True)),
    ("/a/./b/../c", (("a", "c"), False)),
    ("/a/%2e%2e/c", (("c",), False)),
    ("/a/..", ((), True)),
    ("/%C3%BC%20x", (("ü x",), False)),
    ("/%ff", (("\udcff",), False)),  # not UTF-8: kept as the same bytes on disk
    ("/..", None), ("/a/../..", None), ("/.git/config", None), ("/a/.b", None),
    ("/%2ehidden", None), ("/a%00b", None), ("a", None),
    ("/a/.b/../c", (("a", "c"), False)),
    ("/.git/../a", (("a",), False)), ("/a/.b/..", (("a",), True)), ("/a/.b/c/..", None),
])
def test_path_segments(path, expected):
    assert sem.path_segments(path) == expected


@pytest.mark.parametrize("target, path", [
    ("/a?b=c", "/a"), ("/a#f", "/a"), ("http://h:1/x/y?q", "/x/y"), ("http://h", "/"),
    ("*", ""),
])
def test_target_path(target, path):
    assert sem.target_path(target) == path


@pytest.mark.parametrize("value, size, expected", [
    ("bytes=0-0", 10, [(0, 0)]), ("bytes=9-", 10, [(9, 9)]), ("bytes=-20", 10, [(0, 9)]),
    ("bytes=5-100", 10, [(5, 9)]), ("bytes=10-", 10, []), ("bytes=-0", 10, []),
    ("bytes=0-1, 3-4", 10, [(0, 1), (3, 4)]), ("bytes=0-1,20-30", 10, [(0, 1)]),
    ("BYTES=1 - 3", 10, [(1, 3)]), ("bytes=00-01", 10, [(0, 1)]),
    ("bytes=0-1,,3-4", 10, [(0, 1), (3, 4)]),  # empty list elements (RFC 9110 §5.6.1)
    ("bytes=0-1,5-1", 10, [(0, 1)]),  # a backwards part alone is dropped, as nginx does
    # an invalid ranges-specifier is rejected (RFC 9110 §14.2 lets a server), as nginx does
    ("bytes=3-2", 10, []), ("bytes=a-b", 10, []), ("bytes=1-2;x", 10, []), ("bytes=0-1,-", 10, []),
    ("bytes=0-1 x", 10, []), ("bytes=-", 10, []), ("bytes=1", 10, []), ("bytes=,", 10, []),
    ("bytes=- 5", 10, []), ("bytes=0-99999999999999999999", 10, []),
    # ignored: another unit, no "bytes=" prefix as such, nothing to parse
    ("pages=1-2", 10, None), ("bytes = 0-1", 10, None), ("bytes=", 10, None),
    ("bytes=" + ",".join(["0-0"] * 40), 100, None),
    ("bytes=0-9,0-9", 10, None),  # overlapping parts larger than the file: send it whole
    # an empty file: every range that starts at 0 is the whole (empty) file
    ("bytes=0-", 0, None), ("bytes=-1", 0, None), ("bytes=-0", 0, None), ("bytes=0-0", 0, None),
    ("bytes=5-", 0, []), ("bytes=x", 0, []),
])
def test_parse_range(value, size, expected):
    assert sem.parse_range(value, size) == expected


@pytest.mark.parametrize("host, valid", [
    ("localhost", True), ("a.", True), ("127.0.0.1:8080", True), ("[::1]:80", True),
    ("a_b", True), ("é", True), ("a:b", True),
    ("", False), (":80", False), (".", False), ("a..b", False), ("a/b", False), ("a b", False),
    ("a\tb", False), ("a\x7fb", False), ("[::1]..", False),
])
def test_valid_host_as_nginx_checks_it(host, valid):
    assert sem.valid_host(host) is valid


@pytest.mark.parametrize("path, valid", [
    ("/a%20b", True), ("/%e2%82%ac", True), ("/plain", True),
    ("/a%zz", False), ("/a%", False), ("/a%2", False), ("/%%41", False),
])
def test_escapes_valid(path, valid):
    assert sem.escapes_valid(path) is valid


@pytest.mark.parametrize("values, close", [
    ((), False), (("keep-alive",),  False), (("keep-alive, close",), True),
    (("Keep-Alive", "Close"), True), (("closed",), False),
])
def test_has_close_option(values, close):
    assert sem.has_close_option(values) is close


from fileserver_ctl import http_lenient as lenient


@pytest.mark.parametrize("data, mended", [
    (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    (b"GET / HTTP/1.9\r\n", b"GET / HTTP/1.1\r\n"),
    (b"GET / HTTP/2.0\r\n\r\n", b"GET / HTTP/2.0\r\n\r\n"),  # not 1.x: refused later
    ("GET /é?q=é HTTP/1.1\r\n\r\n".encode(), b"GET /%C3%A9?q=%C3%A9 HTTP/1.1\r\n\r\n"),
    (b"GET / HTTP/1.1\nHost: a\n\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    (b"GET / HTTP/1.1\r\nUser-Agent: a\r\nuser-agent: b\r\nX: 1\r\nX: 2\r\n\r\n",
     b"GET / HTTP/1.1\r\nUser-Agent: a\r\nX: 1\r\nX: 2\r\n\r\n"),
    # a body is copied as it is, the head after it mended
    (b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n\n\n\xff\nGET / HTTP/1.2\r\n\r\n",
     b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n\n\n\xff\nGET / HTTP/1.1\r\n\r\n"),
    # what cannot be framed is left alone
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.2\r\n",
     b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET / HTTP/1.2\r\n"),
    (b"GET /\xff HT", b"GET /\xff HT"),  # an unfinished line waits as it is
    (b"GET / HTTP/1.1\rHost: a\r\n\r\n", b"GET / HTTP/1.1\rHost: a\r\n\r\n"),  # bare CR stays
])
def test_mend(data, mended):
    assert lenient.mend(data)[0] == mended


def test_mend_reports_where_each_request_starts():
    data = b"\r\nGET /a HTTP/1.1\nHost: a\n\nGET /b HTTP/1.1\r\n\r\nBAD"
    out, starts = lenient.mend(data)
    assert [out[i:i + 6] for i in starts] == [b"GET /a", b"GET /b", b"BAD"]


def test_precondition_order_rfc9110_13_2_2():
    tag, lm = '"t"', 1000
    h = lambda **kw: {k.replace("_", "-"): v for k, v in kw.items()}
    status = lambda **kw: sem.precondition_status(h(**kw), tag, lm, is_get_or_head=True)
    assert status() == 200
    assert status(If_Match='"x"') == 412
    assert status(If_Match='"x"', If_None_Match=tag) == 412
    assert status(If_Match=tag, If_None_Match=tag) == 304
    assert status(If_Unmodified_Since=response.http_date(999)) == 412
    assert status(If_Unmodified_Since=response.http_date(1000)) == 200
    assert status(If_Unmodified_Since="garbage") == 200
    assert status(If_None_Match='W/"t"') == 304
    assert status(If_None_Match='"u"', If_Modified_Since=response.http_date(2000)) == 200
    assert status(If_Modified_Since=response.http_date(1000)) == 304
    assert status(If_Modified_Since=response.http_date(999)) == 200
    assert sem.precondition_status({"If-None-Match": tag}, tag, lm, is_get_or_head=False) == 412


def test_http_date_formats_and_strictness():
    for value in ("Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT",
                  "Sun Nov  6 08:49:37 1994"):
        assert sem.parse_http_date(value) == 784111777
    for value in ("", "yesterday", "Sun, 32 Nov 1994 08:49:37 GMT",
                  "Sun, 06 Nov 1994 25:49:37 GMT", "Sun, 06 Nov 1994 08:49:37 +0100",
                  "sun, 06 nov 1994 08:49:37 gmt", "Sun, 6 Nov 1994 08:49:37 GMT",
                  "06 Nov 1994 08:49:37 GMT", "Sun, 06 Nov 94 08:49:37 GMT",
                  "Sunday, 06-Nov-1994 08:49:37 GMT", "Sun Nov  6 08:49:37 94",
                  "Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT"):
        assert sem.parse_http_date(value) is None
    # read as nginx reads them: the day name skipped, what follows the time ignored
    for value in ("Mon, 06 Nov 1994 08:49:37 GMT; length=91", "Sun,06 Nov 1994 08:49:37",
                  "Sunday, 06-Nov-94 08:49:37", "Sun Nov 6 08:49:37 1994 GMT"):
        assert sem.parse_http_date(value) == 784111777
    # RFC 850's year: the latest with those digits not more than 50 years ahead
    now = 1795651200  # Wed, 26 Nov 2026
    assert sem.parse_http_date("Sunday, 06-Nov-76 08:49:37 GMT", now) == 3371878177  # 2076
    assert sem.parse_http_date("Saturday, 06-Nov-77 08:49:37 GMT", now) == 247654177  # 1977


@pytest.mark.parametrize("accept, available, expected", [
    (None, ("gzip",), None), ("gzip", (), None), ("gzip", ("gzip", "br"), "gzip"),
    ("gzip, br", ("gzip", "br"), "br"), ("br;q=0.1, gzip", ("gzip", "br"), "gzip"),
    ("*;q=0.5", ("gzip",), "gzip"), ("*, gzip;q=0", ("gzip",), None),
    ("GZIP", ("gzip",), "gzip"), ("gzip;q=abc", ("gzip",), None), ("gzip;q=2", ("gzip",), None),
])
def test_choose_coding(accept, available, expected):
    assert sem.choose_coding(accept, available) == expected

# --- a live server: fixtures ---------------------------------------------------------------

import json
import random
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

from fileserver_ctl import config
from servers import pick_port, start_fsctl

REPO = Path(__file__).resolve().parent.parent
PORTS = range(18100, 18200)
KEEPALIVE_TIMEOUT = 2  # seconds; passed to the servers the tests start
HEADER_TIMEOUT = 3  # seconds to send a whole request head
STARTUP_TIMEOUT = 30.0

# Runs serve() in a child process; argv[1] is JSON of the settings to change.
SERVE_SNIPPET = r"""
import json, sys
from pathlib import Path
from fileserver_ctl.config import Settings
from fileserver_ctl.server import serve
cfg = json.loads(sys.argv[1])
settings = Settings(port=cfg["port"], docroot=Path(cfg["docroot"]), workers=cfg["workers"],
                    autoindex=cfg.get("autoindex", False), verbose=cfg.get("verbose", False),
                    access_log=Path(cfg["access_log"]) if cfg.get("access_log") else None)
served = cfg.get("served_log")
def on_served(rel, st):
    with open(served, "a") as f:
        f.write(f"{rel} {st.st_size}\n")
sys.exit(serve(settings, on_ready=lambda: print("ready", flush=True),
               on_served=on_served if served else None))
"""


@dataclass
class Server:
    kind: str  # "user" or "kernel"
    port: int
    docroot: Path
    proc: subprocess.Popen
    served_log: Path | None = None
    stderr_log: Path | None = None  # the server's stderr, where tracebacks would land

    def workers(self) -> set[int]:
        """Pids of the worker processes (children of the server process)."""
        pids = set()
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            pids.update(int(p) for p in children)
        return pids

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def start_user_server(docroot: Path, tmp: Path, *, workers: int = 2, **cfg) -> Server:
    port = pick_port(PORTS)
    served = tmp / f"served-{port}.log"
    args = {"port": port, "docroot": str(docroot), "workers": workers,
            "served_log": str(served), **cfg}
    env = {**os.environ, "FILESERVER_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT),
           "FILESERVER_HEADER_TIMEOUT": str(HEADER_TIMEOUT), "PYTHONPATH": str(REPO)}
    stderr_log = tmp / f"stderr-{port}.log"
    with open(stderr_log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", SERVE_SNIPPET, json.dumps(args)], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline()  # "ready" once every worker accepts
    if line.strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"server did not start: {line!r} {stderr_log.read_text()}")
    return Server("user", port, docroot, proc, served_log=served, stderr_log=stderr_log)


def start_kernel_server(docroot: Path) -> Server:
    port = pick_port(PORTS)
    env = {"FILESERVER_PORT": str(port), "FILESERVER_DOCROOT": str(docroot),
           "FILESERVER_INTERFACE": "lo", "FILESERVER_KEEPALIVE_TIMEOUT": str(KEEPALIVE_TIMEOUT),
           "FILESERVER_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}
    proc = start_fsctl([], port, env=env, stderr=None).proc
    return Server("kernel", port, docroot, proc)


def kernel_path_missing() -> str | None:
    if not (REPO / "fileserver_ctl" / "cli.py").exists():
        return "kernel path not available yet (fileserver_ctl/cli.py missing)"
    if not config.BPF_OBJECT.exists():
        return f"kernel path not available yet ({config.BPF_OBJECT} not built)"
    if os.geteuid() != 0:
        return "kernel path needs root"
    return None


OUTSIDE_SECRET = b"outside the docroot\n"


def build_docroot(root: Path, outside: Path) -> None:
    """Every kind of file the tests ask for; contents are seeded so runs are reproducible."""
    rng = random.Random(1234)
    root.mkdir()
    (root / "index.html").write_bytes(b"<!doctype html><title>root</title>\n")
    (root / "small.txt").write_bytes(b"hello, world\n" * 7)
    (root / "f1k.bin").write_bytes(rng.randbytes(1024))
    (root / "big.bin").write_bytes(rng.randbytes(3 << 20 | 123))  # sent with sendfile
    (root / "empty.txt").write_bytes(b"")
    (root / "style.css").write_bytes(b"body { color: red }\n")
    (root / "data.json").write_bytes(b'{"a": 1}\n')
    (root / "noext").write_bytes(b"\x00\x01binary")
    (root / "app.js").write_bytes(b"console.log('identity');\n" * 20)
    (root / "app.js.gz").write_bytes(b"\x1f\x8b" + rng.randbytes(100))
    (root / "app.js.br").write_bytes(b"\xce\xb2" + rng.randbytes(80))
    (root / "space name.txt").write_bytes(b"space\n")
    (root / "ünïcödé €.txt").write_bytes("utf-8 name ✓\n".encode())
    (root / ".hidden").write_bytes(b"secret\n")
    (root / ".hiddendir").mkdir()
    (root / ".hiddendir" / "file.txt").write_bytes(b"secret too\n")
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_bytes(b"<p>sub index</p>\n")
    (root / "sub" / "page.txt").write_bytes(b"sub page\n")
    (root / "sub" / "deeper").mkdir()
    (root / "sub" / "deeper" / "leaf.txt").write_bytes(b"leaf\n")
    (root / "noindex").mkdir()
    (root / "noindex" / "a.txt").write_bytes(b"a\n")
    (root / "link_in.txt").symlink_to("small.txt")
    (root / "link_hidden").symlink_to(".hidden")
    outside.mkdir()
    (outside / "secret.txt").write_bytes(OUTSIDE_SECRET)
    (root / "link_out.txt").symlink_to(outside / "secret.txt")
    (root / "dirlink_out").symlink_to(outside)
    (root / "loop").symlink_to("loop")
    os.mkfifo(root / "fifo")
    (root / "mutable").mkdir()  # tests that rewrite files work here


@pytest.fixture(scope="module")
def docroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("http")
    build_docroot(base / "www", base / "outside")
    return base / "www"


@pytest.fixture(scope="module", params=["user", "kernel"])
def server(request: pytest.FixtureRequest, docroot: Path, tmp_path_factory) -> Server:
    """The server under test, once per path: the same assertions must hold for both."""
    if request.param == "kernel":
        reason = kernel_path_missing()
        if reason:
            pytest.skip(reason)
        srv = start_kernel_server(docroot)
    else:
        srv = start_user_server(docroot, tmp_path_factory.mktemp("user"))
    yield srv
    assert srv.stop() == 0
    if srv.stderr_log is not None:
        assert "Traceback" not in srv.stderr_log.read_text()


@pytest.fixture(scope="module")
def user_server(docroot: Path, tmp_path_factory) -> Server:
    """The user-space server alone, for what only it has (worker processes, on_served)."""
    srv = start_user_server(docroot, tmp_path_factory.mktemp("user-only"))
    yield srv
    assert srv.stop() == 0


# --- a raw HTTP/1.1 client with exact byte checks ------------------------------------------

@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes  # status line and header block, exactly as received (with the blank line)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None

    def names(self) -> list[str]:
        return [k for k, _ in self.headers]


class Conn:
    """One TCP connection: send raw bytes, read responses one by one."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(1 << 20)
        self.buf += chunk
        return bool(chunk)

    def read_response(self, head_only: bool = False) -> Response:
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"closed before a full head; got {self.buf[:200]!r}")
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end], self.buf[end:]
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, status, reason = lines[0].split(" ", 2)
        assert version == "HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(": ")
            assert sep and name and value == value.strip(), f"malformed header line {line!r}"
            headers.append((name, value))
        resp = Response(int(status), reason, headers, b"", head)
        length = resp.header("Content-Length")
        if head_only or resp.status == 304:
            return resp
        assert length is not None, f"no Content-Length in {head!r}"
        n = int(length)
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError(f"closed after {len(self.buf)} of {n} body bytes")
        resp.body, self.buf = self.buf[:n], self.buf[n:]
        return resp

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the server has closed (EOF or RST), False if it stays open for `timeout`."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True


def req(path: str, method: str = "GET", headers: dict | None = None, *, version: str = "HTTP/1.1",
        host: bool = True) -> bytes:
    lines = [f"{method} {path} {version}"]
    if host:
        lines.append("Host: localhost")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def fetch(port: int, path: str, method: str = "GET", headers: dict | None = None,
          **kw) -> Response:
    with Conn(port) as c:
        c.send(req(path, method, headers, **kw))
        return c.read_response(head_only=method == "HEAD")


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send bytes, read until the server closes (or `timeout` passes); everything received."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def has_sibling(path: Path) -> bool:
    return any(path.with_name(path.name + s).exists() for s in (".gz", ".br"))


def expected_head(resp: Response, path: Path, status: int = 200, **kw) -> bytes:
    """What response.py builds for this file, with the Date the server sent."""
    date = resp.header("Date")
    assert date is not None and len(date) == response.DATE_LEN
    return response.file_head(status, os.stat(path), path, date, vary=has_sibling(path), **kw)


# --- files: exact bytes -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["small.txt", "f1k.bin", "index.html", "style.css", "data.json",
                                  "noext", "empty.txt", "app.js", "big.bin"])
def test_get_file_exact_head_and_body(server: Server, name: str):
    path = server.docroot / name
    resp = fetch(server.port, "/" + name)
    assert resp.status == 200
    assert resp.head == expected_head(resp, path)
    assert resp.body == path.read_bytes()


def test_header_order_and_validators(server: Server):
    path = server.docroot / "small.txt"
    resp = fetch(server.port, "/small.txt")
    assert resp.names() == ["Server", "Date", "Content-Type", "Content-Length", "Last-Modified",
                            "ETag", "Accept-Ranges"]
    st = os.stat(path)
    assert resp.header("Server") == "ebpf-fileserver"
    assert resp.header("ETag") == response.etag(st)
    assert resp.header("Last-Modified") == response.http_date(st.st_mtime)
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert abs(time.mktime(time.strptime(resp.header("Date"), "%a, %d %b %Y %H:%M:%S GMT"))
               - time.mktime(time.gmtime())) < 5


def test_head_has_get_headers_and_no_body(server: Server):
    path = server.docroot / "f1k.bin"
    with Conn(server.port) as c:
        c.send(req("/f1k.bin", "HEAD"))
        head = c.read_response(head_only=True)
        assert head.head == expected_head(head, path)
        c.send(req("/small.txt"))  # a body after the HEAD would corrupt this answer
        nxt = c.read_response()
        assert nxt.status == 200 and nxt.body == (server.docroot / "small.txt").read_bytes()


def test_head_of_large_file(server: Server):
    path = server.docroot / "big.bin"
    with Conn(server.port) as c:
        c.send(req("/big.bin", "HEAD") + req("/empty.txt"))
        head = c.read_response(head_only=True)
        assert head.header("Content-Length") == str(path.stat().st_size)
        assert c.read_response().body == b""


@pytest.mark.parametrize("target, name", [
    ("/space%20name.txt", "space name.txt"),
    ("/%C3%BCn%C3%AFc%C3%B6d%C3%A9%20%E2%82%AC.txt", "ünïcödé €.txt"),
    ("/small.txt?x=1&y=%00", "small.txt"),
    ("/sub/../small.txt", "small.txt"),
    ("/./small.txt", "small.txt"),
    ("//small.txt", "small.txt"),
    ("/sub/%2e%2e/small.txt", "small.txt"),
    ("/%73mall.txt", "small.txt"),
    ("/sub/deeper/../page.txt", "sub/page.txt"),
    ("/link_in.txt", "small.txt"),
    ("/", "index.html"),
    ("/sub/", "sub/index.html"),
    ("/sub/?q=1", "sub/index.html"),
    ("http://localhost/small.txt", "small.txt"),
])
def test_path_forms_map_to_the_file(server: Server, target: str, name: str):
    resp = fetch(server.port, target)
    assert resp.status == 200, target
    assert resp.body == (server.docroot / name).read_bytes()


@pytest.mark.parametrize("target", [
    "/missing.txt", "/.hidden", "/.hiddendir/file.txt", "/%2ehidden", "/sub/../.hidden",
    "/link_hidden", "/link_out.txt", "/dirlink_out/secret.txt", "/../outside/secret.txt",
    "/%2e%2e/outside/secret.txt", "/sub/../../outside/secret.txt", "/small.txt%00.html",
    "/small.txt%00", "/small.txt/", "/noindex/", "/fifo", "/sub/missing/",
])
def test_not_found_leaks_nothing(server: Server, target: str):
    resp = fetch(server.port, target)
    assert resp.status == 404, target
    assert resp.header("Content-Type") == "text/html; charset=utf-8"
    assert OUTSIDE_SECRET not in resp.body and b"secret" not in resp.body
    assert resp.body == response.error_body(404)


@pytest.mark.parametrize("target", ["/loop", "/loop/", "/loop/x.txt"])
def test_symlink_loop_is_forbidden(server: Server, target: str):
    """open() fails with ELOOP: nginx says 403 (test_parity_paths), and nothing more."""
    resp = fetch(server.port, target)
    assert resp.status == 403, target
    assert resp.body == response.error_body(403)


def test_not_found_keeps_the_connection(server: Server):
    with Conn(server.port) as c:
        c.send(req("/missing"))
        assert c.read_response().status == 404
        c.send(req("/small.txt"))
        assert c.read_response().status == 200


@pytest.mark.parametrize("target, location", [
    ("/sub", "/sub/"), ("/sub/deeper", "/sub/deeper/"), ("/sub?a=1", "/sub/?a=1"),
    ("/noindex", "/noindex/"),
])
def test_folder_without_slash_redirects(server: Server, target: str, location: str):
    resp = fetch(server.port, target)
    assert resp.status == 301
    assert resp.header("Location") == location
    assert resp.header("Content-Length") == str(len(resp.body))


# --- methods ------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
def test_other_methods_405_with_allow(server: Server, method: str):
    with Conn(server.port) as c:
        c.send(req("/small.txt", method, {"Content-Length": "5"}) + b"hello")
        resp = c.read_response()
        assert resp.status == 405
        assert resp.header("Allow") == "GET, HEAD"
        c.send(req("/small.txt"))  # the body was consumed: the stream is still in sync
        assert c.read_response().body == (server.docroot / "small.txt").read_bytes()


def test_trace_405_then_closes(server: Server):
    """nginx ends the connection after refusing TRACE; so does this server."""
    with Conn(server.port) as c:
        c.send(req("/small.txt", "TRACE"))
        resp = c.read_response()
        assert resp.status == 405 and resp.header("Allow") == "GET, HEAD"
        assert resp.header("Connection") == "close" and c.closed_by_peer()


def test_unknown_method_is_rejected(server: Server):
    resp = fetch(server.port, "/small.txt", "FROB")
    assert resp.status in (405, 501)
    assert b"hello" not in resp.body


# --- conditional requests (RFC 9110 §13) ----------------------------------------------------

def validators(server: Server, name: str = "small.txt") -> tuple[str, str]:
    st = os.stat(server.docroot / name)
    return response.etag(st), response.http_date(st.st_mtime)


def test_if_none_match_304_exact(server: Server):
    path = server.docroot / "small.txt"
    etag, _ = validators(server)
    with Conn(server.port) as c:
        c.send(req("/small.txt", headers={"If-None-Match": etag}))
        resp = c.read_response()
        assert resp.status == 304
        assert resp.head == expected_head(resp, path, 304)
        assert resp.header("Content-Length") is None
        c.send(req("/small.txt"))  # a 304 has no body: the next answer starts right here
        assert c.read_response().body == path.read_bytes()


@pytest.mark.parametrize("make_value, status", [
    (lambda e: e, 304),
    (lambda e: "W/" + e, 304),  # weak comparison
    (lambda e: f'"nope", {e}', 304),
    (lambda e: f'"a",   "b" ,{e}', 304),
    (lambda e: "*", 304),
    (lambda e: '"nope"', 200),
    (lambda e: e[:-2] + '"', 200),
    (lambda e: "garbage", 200),
])
def test_if_none_match_forms(server: Server, make_value, status: int):
    etag, _ = validators(server)
    assert fetch(server.port, "/small.txt", headers={"If-None-Match": make_value(etag)}).status == status


def test_if_none_match_on_head(server: Server):
    etag, _ = validators(server)
    resp = fetch(server.port, "/small.txt", "HEAD", headers={"If-None-Match": etag})
    assert resp.status == 304


def test_if_modified_since(server: Server):
    etag, lm = validators(server)
    mtime = int(os.stat(server.docroot / "small.txt").st_mtime)
    assert fetch(server.port, "/small.txt", headers={"If-Modified-Since": lm}).status == 304
    later = response.http_date(mtime + 3600)
    assert fetch(server.port, "/small.txt", headers={"If-Modified-Since": later}).status == 304
    earlier = response.http_date(mtime - 1)
    assert fetch(server.port, "/small.txt", headers={"If-Modified-Since": earlier}).status == 200
    assert fetch(server.port, "/small.txt", headers={"If-Modified-Since": "yesterday"}).status == 200
    # If-None-Match takes precedence: a non-matching tag means 200 whatever the date says
    assert fetch(server.port, "/small.txt",
                 headers={"If-None-Match": '"other"', "If-Modified-Since": lm}).status == 200


def test_if_match_and_if_unmodified_since(server: Server):
    etag, lm = validators(server)
    mtime = int(os.stat(server.docroot / "small.txt").st_mtime)
    body = (server.docroot / "small.txt").read_bytes()
    ok = fetch(server.port, "/small.txt", headers={"If-Match": etag})
    assert ok.status == 200 and ok.body == body
    assert fetch(server.port, "/small.txt", headers={"If-Match": "*"}).status == 200
    assert fetch(server.port, "/small.txt", headers={"If-Match": f'"x", {etag}'}).status == 200
    assert fetch(server.port, "/small.txt", headers={"If-Match": '"x"'}).status == 412
    assert fetch(server.port, "/small.txt", headers={"If-Match": "W/" + etag}).status == 412
    assert fetch(server.port, "/small.txt",
                 headers={"If-Unmodified-Since": response.http_date(mtime - 10)}).status == 412
    assert fetch(server.port, "/small.txt", headers={"If-Unmodified-Since": lm}).status == 200
    # If-Match is evaluated first: it fails even though If-None-Match would give 304
    assert fetch(server.port, "/small.txt",
                 headers={"If-Match": '"x"', "If-None-Match": etag}).status == 412
    # If-Match passes, If-Unmodified-Since is then ignored (RFC 9110 §13.2.2 step 2)
    assert fetch(server.port, "/small.txt",
                 headers={"If-Match": etag,
                          "If-Unmodified-Since": response.http_date(mtime - 10)}).status == 200


def test_conditional_on_large_file(server: Server):
    etag, _ = validators(server, "big.bin")
    assert fetch(server.port, "/big.bin", headers={"If-None-Match": etag}).status == 304
    assert fetch(server.port, "/big.bin", headers={"If-Match": '"x"'}).status == 412


# --- ranges (RFC 9110 §14) ------------------------------------------------------------------

@pytest.mark.parametrize("name", ["small.txt", "big.bin"])
@pytest.mark.parametrize("spec, first, last", [
    ("bytes=0-4", 0, 4), ("bytes=5-", 5, None), ("bytes=-3", -3, None),
    ("bytes=2-2", 2, 2), ("bytes=0-99999999", 0, None), ("BYTES=1 - 3", 1, 3),
])
def test_single_range(server: Server, name: str, spec: str, first: int, last: int | None):
    data = (server.docroot / name).read_bytes()
    size = len(data)
    resp = fetch(server.port, "/" + name, headers={"Range": spec})
    a = first if first >= 0 else size + first
    b = size - 1 if last is None else last
    assert resp.status == 206
    assert resp.header("Content-Range") == f"bytes {a}-{b}/{size}"
    assert resp.header("Content-Length") == str(b - a + 1)
    assert resp.header("ETag") == response.etag(os.stat(server.docroot / name))
    assert resp.body == data[a:b + 1]


def test_range_unsatisfiable_416(server: Server):
    size = (server.docroot / "small.txt").stat().st_size
    with Conn(server.port) as c:
        # unsatisfiable, and (as nginx) invalid specifiers too: RFC 9110 §14.2 allows rejecting
        for spec in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0", "bytes=5-1",
                     "bytes=x-y", "bytes=1-2;x", "bytes=0-1,-", "bytes=0-1 x", "bytes=,",
                     "bytes=0-99999999999999999999"):
            c.send(req("/small.txt", headers={"Range": spec}))
            resp = c.read_response()
            assert resp.status == 416, spec
            assert resp.header("Content-Range") == f"bytes */{size}"
            assert resp.body == response.error_body(416)


@pytest.mark.parametrize("spec", ["items=0-1", "bytes=", "bytes = 0-1",
                                  "bytes=0-5,2-8,1-9,3-20,0-100"])
def test_range_ignored_sends_whole_file(server: Server, spec: str):
    data = (server.docroot / "small.txt").read_bytes()
    resp = fetch(server.port, "/small.txt", headers={"Range": spec})
    assert resp.status == 200 and resp.body == data


@pytest.mark.parametrize("spec, status", [
    ("bytes=0-", 200), ("bytes=-1", 200), ("bytes=0-0", 200), ("bytes=-0", 200),
    ("bytes=5-", 416), ("bytes=1-0", 416),
])
def test_range_of_an_empty_file(server: Server, spec: str, status: int):
    """A range from 0 of an empty file is the whole file, sent with 200 (RFC 9110 §14.2 lets a
    server ignore Range; nginx does): never a 206 of nothing, never 416 for "bytes=-1"."""
    path = server.docroot / "empty.txt"
    resp = fetch(server.port, "/empty.txt", headers={"Range": spec})
    assert resp.status == status, spec
    if status == 200:
        assert resp.head == expected_head(resp, path) and resp.body == b""
    else:
        assert resp.header("Content-Range") == "bytes */0"


def test_range_on_head_is_ignored(server: Server):
    """RFC 9110 §14.2: GET is the only method with range handling (nginx answers HEAD with 206)."""
    path = server.docroot / "small.txt"
    with Conn(server.port) as c:
        c.send(req("/small.txt", "HEAD", headers={"Range": "bytes=0-3"}) + req("/empty.txt"))
        head = c.read_response(head_only=True)
        assert head.status == 200 and head.head == expected_head(head, path)
        assert c.read_response().body == b""  # nothing was sent after the HEAD answer


def parse_multipart(resp: Response) -> list[tuple[str, bytes]]:
    ctype = resp.header("Content-Type")
    assert ctype.startswith("multipart/byteranges; boundary=")
    boundary = ctype.split("boundary=", 1)[1].encode()
    body = resp.body
    assert body.endswith(b"\r\n--" + boundary + b"--\r\n")
    parts = []
    for chunk in body.split(b"\r\n--" + boundary)[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().strip().split("\r\n"))
        parts.append((fields["Content-Range"], data))
    return parts


@pytest.mark.parametrize("name", ["small.txt", "big.bin"])
def test_multiple_ranges_multipart(server: Server, name: str):
    data = (server.docroot / name).read_bytes()
    size = len(data)
    resp = fetch(server.port, "/" + name, headers={"Range": "bytes=0-1, 10-19,-5"})
    assert resp.status == 206
    assert resp.header("Content-Length") == str(len(resp.body))
    assert parse_multipart(resp) == [
        (f"bytes 0-1/{size}", data[0:2]),
        (f"bytes 10-19/{size}", data[10:20]),
        (f"bytes {size - 5}-{size - 1}/{size}", data[-5:]),
    ]
    resp = fetch(server.port, "/" + name, headers={"Range": "bytes=0-0,-1"})
    assert parse_multipart(resp) == [(f"bytes 0-0/{size}", data[:1]),
                                     (f"bytes {size - 1}-{size - 1}/{size}", data[-1:])]
    resp = fetch(server.port, "/" + name, headers={"Range": "bytes=0-0,,2-2"})  # empty element
    assert parse_multipart(resp) == [(f"bytes 0-0/{size}", data[:1]),
                                     (f"bytes 2-2/{size}", data[2:3])]


def test_multiple_ranges_one_satisfiable_is_single_part(server: Server):
    data = (server.docroot / "small.txt").read_bytes()
    resp = fetch(server.port, "/small.txt", headers={"Range": f"bytes=0-3,{len(data) + 5}-"})
    assert resp.status == 206
    assert resp.header("Content-Range") == f"bytes 0-3/{len(data)}"
    assert resp.body == data[:4]


def test_if_range(server: Server):
    etag, lm = validators(server)
    data = (server.docroot / "small.txt").read_bytes()
    mtime = int(os.stat(server.docroot / "small.txt").st_mtime)
    r = fetch(server.port, "/small.txt", headers={"Range": "bytes=0-3", "If-Range": etag})
    assert r.status == 206 and r.body == data[:4]
    r = fetch(server.port, "/small.txt", headers={"Range": "bytes=0-3", "If-Range": '"old"'})
    assert r.status == 200 and r.body == data
    r = fetch(server.port, "/small.txt", headers={"Range": "bytes=0-3", "If-Range": lm})
    assert r.status == 206 and r.body == data[:4]
    r = fetch(server.port, "/small.txt",
              headers={"Range": "bytes=0-3", "If-Range": response.http_date(mtime - 60)})
    assert r.status == 200 and r.body == data
    r = fetch(server.port, "/small.txt", headers={"Range": "bytes=0-3", "If-Range": "W/" + etag})
    assert r.status == 200  # a weak tag never validates a range


# --- precompressed variants ----------------------------------------------------------------

@pytest.mark.parametrize("accept, variant, coding", [
    ("gzip", "app.js.gz", "gzip"),
    ("gzip, deflate, br", "app.js.br", "br"),
    ("br;q=0.5, gzip;q=0.8", "app.js.gz", "gzip"),
    ("x-gzip", "app.js.gz", "gzip"),
    ("*", "app.js.br", "br"),
    ("gzip;q=0, br;q=0", "app.js", None),
    ("identity", "app.js", None),
    ("deflate", "app.js", None),
])
def test_precompressed_negotiation(server: Server, accept: str, variant: str, coding: str | None):
    root = server.docroot
    resp = fetch(server.port, "/app.js", headers={"Accept-Encoding": accept})
    assert resp.status == 200
    assert resp.body == (root / variant).read_bytes()
    assert resp.header("Content-Encoding") == coding
    assert resp.header("Vary") == "Accept-Encoding"
    assert "javascript" in resp.header("Content-Type")
    assert resp.header("ETag") == response.etag(os.stat(root / variant))
    assert resp.head == response.file_head(200, os.stat(root / variant), root / "app.js",
                                           resp.header("Date"), content_encoding=coding, vary=True)


def test_precompressed_without_accept_encoding_is_identity_with_vary(server: Server):
    resp = fetch(server.port, "/app.js")
    assert resp.body == (server.docroot / "app.js").read_bytes()
    assert resp.header("Content-Encoding") is None and resp.header("Vary") == "Accept-Encoding"


def test_precompressed_304_and_range_use_the_variant(server: Server):
    gz = server.docroot / "app.js.gz"
    tag = response.etag(os.stat(gz))
    resp = fetch(server.port, "/app.js", headers={"Accept-Encoding": "gzip", "If-None-Match": tag})
    assert resp.status == 304 and resp.header("Vary") == "Accept-Encoding"
    resp = fetch(server.port, "/app.js", headers={"Accept-Encoding": "gzip", "Range": "bytes=0-9"})
    assert resp.status == 206 and resp.body == gz.read_bytes()[:10]
    assert resp.header("Content-Encoding") == "gzip"


def test_compressed_file_asked_for_directly(server: Server):
    resp = fetch(server.port, "/app.js.gz")
    assert resp.body == (server.docroot / "app.js.gz").read_bytes()
    assert resp.header("Content-Encoding") is None
    assert resp.header("Content-Type") == "application/gzip"


# --- protocol hygiene ---------------------------------------------------------------------

def error_status(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    return int(raw[9:12])


@pytest.mark.parametrize("data, status", [
    (b"GET /small.txt HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),  # §6.1
    (b"GET /small.txt HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /small.txt\r\n", 400),  # HTTP/0.9: refused at once, not waited on
    (b"HELLO THERE\r\n\r\n", 400),  # no version: not a request line, so no 501
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
    (b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /small.txt HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /small.txt HTTP/3.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /small.txt HTTP/9.9\r\nHost: a\r\n\r\n", 505),
    (b"GET /small.txt HTTP/0.9\r\nHost: a\r\n\r\n", 400),  # nginx: 400, not 505
    (b"GET /small.txt HTTP/0.0\r\nHost: a\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.10\r\nHost: a\r\n\r\n", 400),  # RFC 9112 §2.3: one digit each
    (b"GET /small.txt HTTP/1\r\nHost: a\r\n\r\n", 400),
    (b"GET /small.txt http/1.1\r\nHost: a\r\n\r\n", 400),
    (b"get /small.txt HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # methods are case-sensitive
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nIf-Modified-Since: x\r\nIf-Modified-Since: y\r\n\r\n",
     400),  # a single-valued field repeated (RFC 9110 §5.3), as nginx refuses it
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nIf-Unmodified-Since: x\r\n"
     b"If-Unmodified-Since: x\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\nIf-Range: x\r\n"
     b"If-Range: x\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nX: a\r\n\tfolded\r\n\r\n", 400),  # obs-fold
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n", 400),  # nginx ignores the line
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),  # CTL in a value
    (b"GET /small.txt HTTP/1.1\rHost: a\r\r", 400),  # a bare CR is no line end
    (b"GET /small.txt HTTP/1.1\r\nHost:\r\n\r\n", 400),  # RFC 9110 §4.2.1: no empty host
    (b"GET /small%zz.txt HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # RFC 9112 §3.2: bad target
    (b"GET /small.txt% HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /s%zzub/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET http://a..b/small.txt HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # absolute-form host
    (b"GET http://x/small.txt HTTP/1.1\r\n\r\n", 400),  # absolute-form needs Host too
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\n"
     + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 1000) for i in range(40)) + b"\r\n", 431),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), 400),  # TLS on the HTTP port
])
def test_bad_requests_get_a_clear_error_and_close(server: Server, data: bytes, status: int):
    raw = raw_exchange(server.port, data)
    assert error_status(raw) == status, raw[:300]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in head + b"\r\n"
    length = int(head.split(b"Content-Length: ", 1)[1].split(b"\r\n", 1)[0])
    assert len(body) == length  # nothing after the error page: the connection was closed


@pytest.mark.parametrize("count", [65, 101, 200, 999])
def test_many_short_header_lines_are_served(server: Server, count: int):
    """Up to nginx's max_headers, 1000 fields with Host, however short (65 lines are past what
    the kernel path parses itself, 101 fit one segment); one more is 431, see
    test_parity_conn.py."""
    data = (b"GET /small.txt HTTP/1.1\r\nHost: a\r\n"
            + b"".join(b"X%d:v\r\n" % i for i in range(count)) + b"\r\n")
    with Conn(server.port) as c:
        c.send(data)
        resp = c.read_response()
        assert resp.status == 200 and resp.body == (server.docroot / "small.txt").read_bytes()


def test_connection_close_is_honoured(server: Server):
    path = server.docroot / "small.txt"
    with Conn(server.port) as c:
        c.send(req("/small.txt", headers={"Connection": "close"}))
        resp = c.read_response()
        assert resp.head == expected_head(resp, path, close=True)
        assert resp.body == path.read_bytes()
        assert c.closed_by_peer()


def test_http10_gets_its_answer_then_close(server: Server):
    with Conn(server.port) as c:
        c.send(b"GET /small.txt HTTP/1.0\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 200 and resp.header("Connection") == "close"
        assert resp.body == (server.docroot / "small.txt").read_bytes()
        assert c.closed_by_peer()


# --- HTTP/1.0 keep-alive, later 1.x versions (RFC 9112 §9.3, RFC 9110 §2.5) -----------------

def refused(c: Conn) -> int:
    """The status of an error answer that closes the connection (fails fast on any other)."""
    resp = c.read_response()
    assert resp.status >= 400 and resp.header("Connection") == "close", resp.head
    assert resp.body == response.error_body(resp.status)
    assert c.closed_by_peer()
    return resp.status


def http10(path: str, method: str = "GET", connection: str | None = "keep-alive") -> bytes:
    head = f"{method} {path} HTTP/1.0\r\n"
    if connection is not None:
        head += f"Connection: {connection}\r\n"
    return (head + "\r\n").encode()


def test_http10_keep_alive_after_a_hand_off(server: Server):
    """ApacheBench -k: HTTP/1.0 with Connection: keep-alive keeps the connection and says so.

    The first request is one the kernel path hands off, so both paths answer from user space.
    """
    root = server.docroot
    with Conn(server.port) as c:
        c.send(http10("/missing"))
        resp = c.read_response()
        assert resp.status == 404 and resp.header("Connection") == "keep-alive"
        for path, method in (("/small.txt", "GET"), ("/f1k.bin", "HEAD"), ("/big.bin", "GET"),
                             ("/sub", "GET"), ("/small.txt", "POST")):
            c.send(http10(path, method, "Keep-Alive"))
            resp = c.read_response(head_only=method == "HEAD")
            assert resp.header("Connection") == "keep-alive", (method, path)
            assert resp.head.endswith(b"\r\nConnection: keep-alive\r\n\r\n")
            if path in ("/small.txt", "/big.bin") and method == "GET":
                assert resp.head == expected_head(resp, root / path[1:])[:-2] + (
                    b"Connection: keep-alive\r\n\r\n")
                assert resp.body == (root / path[1:]).read_bytes()
        c.send(http10("/small.txt", connection=None))  # no keep-alive: answered, then closed
        resp = c.read_response()
        assert resp.header("Connection") == "close" and resp.body == (root / "small.txt").read_bytes()
        assert c.closed_by_peer()


def test_http10_keep_alive_on_a_cached_file(server: Server):
    path = server.docroot / "small.txt"
    with Conn(server.port) as c:
        for _ in range(3):
            c.send(b"GET /small.txt HTTP/1.0\r\nHost: a\r\nUser-Agent: ApacheBench/2.3\r\n"
                   b"Accept: */*\r\nConnection: Keep-Alive\r\n\r\n")
            resp = c.read_response()
            assert resp.head == expected_head(resp, path)[:-2] + b"Connection: keep-alive\r\n\r\n"
            assert resp.body == path.read_bytes()


def test_http10_close_wins_over_keep_alive(server: Server):
    """RFC 9112 §9.3: "close" ends the connection whatever else Connection lists."""
    with Conn(server.port) as c:
        c.send(http10("/small.txt", connection="keep-alive, close"))
        assert c.read_response().header("Connection") == "close"
        assert c.closed_by_peer()


@pytest.mark.parametrize("version", ["HTTP/1.2", "HTTP/1.9"])
def test_later_http1_versions_are_answered_as_http11(server: Server, version: str):
    """RFC 9110 §2.5: a higher minor version is answered in the highest we speak (nginx too)."""
    root = server.docroot
    with Conn(server.port) as c:
        c.send(req("/small.txt", version=version) + req("/f1k.bin", "HEAD", version=version))
        resp = c.read_response()
        assert resp.head == expected_head(resp, root / "small.txt")
        assert resp.body == (root / "small.txt").read_bytes()
        head = c.read_response(head_only=True)
        assert head.head == expected_head(head, root / "f1k.bin")
        c.send(req("/index.html", version=version))  # still open: keep-alive as in HTTP/1.1
        assert c.read_response().body == (root / "index.html").read_bytes()
    # Host is required as in HTTP/1.1
    raw = raw_exchange(server.port, f"GET /small.txt {version}\r\n\r\n".encode())
    assert error_status(raw) == 400


# --- repeated header fields (RFC 9110 §5.3) ---------------------------------------------------

@pytest.mark.parametrize("name", ["User-Agent", "Content-Type", "Max-Forwards", "ETag", "Server",
                                  "Content-Location", "Accept", "Cookie", "Referer",
                                  "Accept-Encoding", "Cache-Control", "X-Custom", "Expect"])
def test_repeated_headers_nginx_accepts(server: Server, name: str):
    path = server.docroot / "small.txt"
    with Conn(server.port) as c:
        c.send(f"GET /small.txt HTTP/1.1\r\nHost: a\r\n{name}: one\r\n{name}: two\r\n\r\n"
               .encode())
        resp = c.read_response()
        assert resp.head == expected_head(resp, path) and resp.body == path.read_bytes()
        c.send(req("/f1k.bin"))  # the connection goes on
        assert c.read_response().body == (server.docroot / "f1k.bin").read_bytes()


def test_repeated_list_fields_are_combined(server: Server):
    etag, _ = validators(server)
    with Conn(server.port) as c:
        c.send(f'GET /small.txt HTTP/1.1\r\nHost: a\r\nIf-None-Match: "x"\r\n'
               f"If-None-Match: {etag}\r\n\r\n".encode())
        assert c.read_response().status == 304
        c.send(f'GET /small.txt HTTP/1.1\r\nHost: a\r\nIf-Match: "x"\r\n'
               f"If-Match: {etag}\r\n\r\n".encode())
        assert c.read_response().status == 200


def test_repeated_content_range_is_refused(server: Server):
    with Conn(server.port) as c:
        c.send(b"GET /small.txt HTTP/1.1\r\nHost: a\r\nContent-Range: x\r\nContent-Range: x\r\n\r\n")
        assert refused(c) == 400


# --- Host (RFC 9110 §7.2) ---------------------------------------------------------------------

@pytest.mark.parametrize("host", ["a/b", "a b", ":80", ".", "a..b", "a\tb"])
def test_invalid_host_is_refused(server: Server, host: str):
    for _ in range(2):  # the second time the same bytes could come from the parse memo
        with Conn(server.port) as c:
            c.send(f"GET /small.txt HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert refused(c) == 400


@pytest.mark.parametrize("host", ["a.", "[::1]:80", "a_b", "localhost:18100", "127.0.0.1",
                                  "\u00e9"])
def test_valid_hosts_are_served(server: Server, host: str):
    path = server.docroot / "small.txt"
    with Conn(server.port) as c:
        c.send(f"GET /small.txt HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert c.read_response().body == path.read_bytes()


# --- what llhttp refuses but nginx serves ----------------------------------------------------

@pytest.mark.parametrize("target, status, name", [
    ("/ünïcödé%20€.txt".encode(), 200, "ünïcödé €.txt"),
    ("/ünïcödé%20%E2%82%AC.txt".encode(), 200, "ünïcödé €.txt"),
    ("/small.txt?q=é".encode(), 200, "small.txt"),
    ("/é".encode(), 404, None),
    (b"/\xff", 404, None),
    ("/sub/é/../page.txt".encode(), 200, "sub/page.txt"),
])
def test_raw_non_ascii_in_the_target(server: Server, target: bytes, status: int, name):
    """nginx serves raw UTF-8 (and other obs-text) in a target; llhttp refuses it in strict mode,
    so http_lenient percent-encodes those bytes and parses again."""
    with Conn(server.port) as c:
        c.send(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = c.read_response()
        assert resp.status == status
        if name is not None:
            assert resp.body == (server.docroot / name).read_bytes()
        c.send(req("/small.txt"))  # the connection goes on
        assert c.read_response().status == 200


def test_bare_lf_line_ends_are_accepted(server: Server):
    """RFC 9112 §2.2 lets a recipient take a bare LF as a line end; nginx does."""
    root = server.docroot
    with Conn(server.port) as c:
        c.send(b"GET /small.txt HTTP/1.1\nHost: a\n\nHEAD /f1k.bin HTTP/1.1\nHost: a\r\n\n")
        assert c.read_response().body == (root / "small.txt").read_bytes()
        assert c.read_response(head_only=True).status == 200
        c.send(req("/index.html"))
        assert c.read_response().body == (root / "index.html").read_bytes()


def test_lenient_parse_across_reads(server: Server):
    """A head mended after more of it arrived: the new parser carries on with the connection."""
    root = server.docroot
    with Conn(server.port) as c:
        c.send(b"GET /small.txt HTTP/1.1\r\nHost: a\r\nUser-Agent: one\r\n")
        time.sleep(0.05)
        c.send(b"User-Agent: two\r\n\r\nGET /f1k.bin HTTP/1.2\r\nHo")
        time.sleep(0.05)
        c.send(b"st: a\r\n\r\n")
        assert c.read_response().body == (root / "small.txt").read_bytes()
        assert c.read_response().body == (root / "f1k.bin").read_bytes()
        c.send(req("/index.html"))
        assert c.read_response().body == (root / "index.html").read_bytes()
    with Conn(server.port) as c:  # a body split across reads, then a head to mend
        c.send(req("/small.txt", "POST", {"Content-Length": "10"}) + b"hel")
        time.sleep(0.05)
        c.send(b"lo12345" + "GET /ünïcödé%20€.txt HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        assert c.read_response().status == 405
        assert c.read_response().body == (root / "ünïcödé €.txt").read_bytes()
        c.send(req("/index.html"))
        assert c.read_response().body == (root / "index.html").read_bytes()


# --- a bad request after good ones (RFC 9112 §9.3.2) -------------------------------------------

@pytest.mark.parametrize("bad, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /small.txt HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET /small.txt HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /small.txt HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    (b"GET /small%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # an unknown method (FROB) gets 501 and the connection goes on: test_parity_more.py
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
])
def test_requests_before_a_bad_one_are_answered_first(server: Server, bad: bytes, status: int):
    root = server.docroot
    data = (req("/small.txt") + req("/f1k.bin", "HEAD") + req("/big.bin", headers={"Range": "bytes=0-9"})
            + req("/small.txt", "POST", {"Content-Length": "4"}) + b"body" + bad + req("/small.txt"))
    with Conn(server.port, timeout=10) as c:
        c.send(data)
        assert c.read_response().body == (root / "small.txt").read_bytes()
        assert c.read_response(head_only=True).status == 200
        assert c.read_response().body == (root / "big.bin").read_bytes()[:10]
        assert c.read_response().status == 405
        err = c.read_response()
        assert err.status == status and err.header("Connection") == "close"
        assert err.body == response.error_body(status)
        assert c.closed_by_peer()


def test_bad_request_after_one_split_across_reads(server: Server):
    with Conn(server.port) as c:
        c.send(b"GET /small.txt HTTP/1.1\r\nHo")
        time.sleep(0.05)
        c.send(b"st: a\r\n\r\nGARBAGE\r\n\r\n")
        assert c.read_response().body == (server.docroot / "small.txt").read_bytes()
        assert c.read_response().status == 400
        assert c.closed_by_peer()


@pytest.mark.parametrize("first", [req("/small.txt", headers={"Connection": "close"}),
                                   http10("/small.txt", connection=None)])
def test_nothing_is_read_after_a_closing_request(server: Server, first: bytes):
    """What follows a request that closes the connection is never answered, not even with 400."""
    raw = raw_exchange(server.port, first + req("/f1k.bin") + b"GARBAGE\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\nConnection: close")
    assert body == (server.docroot / "small.txt").read_bytes()


# --- other edge cases compared with nginx ------------------------------------------------------

def test_expect_100_continue_on_get_gets_the_final_answer_at_once(server: Server):
    """RFC 9110 §10.1.1 lets a server skip 100 (Continue) and answer: no body is read for GET
    (nginx sends 100 first; both are valid)."""
    path = server.docroot / "small.txt"
    with Conn(server.port) as c:
        c.send(req("/small.txt", headers={"Expect": "100-continue"}))
        resp = c.read_response()
        assert resp.head == expected_head(resp, path) and resp.body == path.read_bytes()


def test_options_asterisk(server: Server):
    """OPTIONS * asks about the server (RFC 9110 §9.3.7): it serves GET and HEAD only."""
    with Conn(server.port) as c:
        c.send(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        resp = c.read_response()
        assert resp.status == 405 and resp.header("Allow") == "GET, HEAD"
        c.send(req("/small.txt"))
        assert c.read_response().status == 200


@pytest.mark.parametrize("target", ["/../small.txt", "/%2e%2e/small.txt", "/sub/../../small.txt"])
def test_climbing_above_the_root_is_404(server: Server, target: str):
    """Issue 3: a path that leaves the docroot is 404 (nginx says 400), leaking nothing."""
    resp = fetch(server.port, target)
    assert resp.status == 404 and resp.body == response.error_body(404)


def test_keep_alive_serves_many_requests(server: Server):
    names = ["small.txt", "f1k.bin", "index.html", "big.bin", "small.txt"]
    with Conn(server.port) as c:
        for name in names:
            c.send(req("/" + name))
            resp = c.read_response()
            assert resp.status == 200 and resp.header("Connection") is None
            assert resp.body == (server.docroot / name).read_bytes()


def test_pipelined_requests_answered_in_order(server: Server):
    root = server.docroot
    plan = [("GET", "/small.txt", 200, root / "small.txt"),
            ("GET", "/missing", 404, None),
            ("HEAD", "/f1k.bin", 200, None),
            ("GET", "/big.bin", 200, root / "big.bin"),
            ("GET", "/f1k.bin", 200, root / "f1k.bin"),
            ("GET", "/sub", 301, None),
            ("GET", "/index.html", 200, root / "index.html")] * 3
    with Conn(server.port, timeout=10) as c:
        c.send(b"".join(req(path, method) for method, path, _, _ in plan))
        for method, path, status, file in plan:
            resp = c.read_response(head_only=method == "HEAD")
            assert resp.status == status, (method, path)
            if file is not None:
                assert resp.body == file.read_bytes(), path


def test_pipelined_request_split_across_segments(server: Server):
    data = req("/small.txt") + req("/f1k.bin")
    with Conn(server.port) as c:
        for i in range(0, len(data), 7):
            c.send(data[i:i + 7])
            time.sleep(0.002)
        assert c.read_response().body == (server.docroot / "small.txt").read_bytes()
        assert c.read_response().body == (server.docroot / "f1k.bin").read_bytes()


def test_partial_request_then_bytes_that_look_like_a_whole_one(server: Server):
    """A chunk equal to an earlier complete request must not be taken for one mid-request."""
    whole = req("/small.txt")
    assert fetch(server.port, "/small.txt").status == 200  # the same bytes, answered before
    with Conn(server.port) as c:
        c.send(b"GET /f1k.bin HTTP/1.1\r\nX-Pad: ")
        time.sleep(0.05)
        c.send(whole)  # now the value of X-Pad, then Host: and the end of the head
        resp = c.read_response()
        assert resp.body == (server.docroot / "f1k.bin").read_bytes()
        c.send(whole)
        assert c.read_response().body == (server.docroot / "small.txt").read_bytes()


def test_request_bodies_are_consumed(server: Server):
    with Conn(server.port) as c:
        c.send(req("/small.txt", headers={"Content-Length": "11"}) + b"hello world")
        c.send(req("/small.txt", headers={"Transfer-Encoding": "chunked"})
               + b"5\r\nhello\r\n0\r\n\r\n")
        c.send(req("/f1k.bin"))
        assert c.read_response().status == 200
        assert c.read_response().status == 200
        assert c.read_response().body == (server.docroot / "f1k.bin").read_bytes()


def test_idle_keep_alive_connection_is_closed(server: Server):
    with Conn(server.port) as c:
        c.send(req("/small.txt"))
        assert c.read_response().status == 200
        start = time.monotonic()
        assert c.closed_by_peer(timeout=KEEPALIVE_TIMEOUT + 4)
        assert time.monotonic() - start >= KEEPALIVE_TIMEOUT - 0.1


class _Transport:
    """The little of an asyncio transport an idle connection touches."""

    closed = False

    def get_extra_info(self, name: str, default=None):
        return default

    def close(self) -> None:
        self.closed = True


def test_late_clock_ticks_do_not_close_a_connection_early(tmp_path: Path):
    """The once-a-second clock of a worker can run late (a busy or starved process), then catch
    up with ticks a few milliseconds apart. A connection active just before is not idle for the
    keep-alive timeout because three ticks ran: seen as a close 1.2 s after the answer with a
    2 s timeout in a loaded full run (test_idle_keep_alive_connection_is_closed[user])."""
    import asyncio

    from fileserver_ctl.http_files import FileStore
    from fileserver_ctl.http_protocol import Worker

    async def scenario() -> tuple[bool, bool]:
        worker = Worker(FileStore(tmp_path), keepalive_timeout=2)
        conn = worker.protocol()
        transport = _Transport()
        conn.connection_made(transport)  # the parser needs a running loop
        for _ in range(4):  # late ticks catching up
            worker.clock()
        early = transport.closed
        conn.last_active -= 2.5  # as if it had been idle for 2.5 s
        worker.clock()
        return early, transport.closed

    assert asyncio.run(scenario()) == (False, True)


def test_slow_header_gets_408(server: Server):
    """A head that keeps trickling in is cut off after the header timeout (slowloris)."""
    with Conn(server.port) as c:
        c.send(b"GET /small.txt HTTP/1.1\r\n")
        start = time.monotonic()
        got = b""
        while time.monotonic() - start < HEADER_TIMEOUT + 4 and not got:
            c.send(b"X: y\r\n")  # keeps the connection busy, never finishes the head
            c.sock.settimeout(0.5)
            try:
                got = c.sock.recv(4096)
            except socket.timeout:
                pass
        assert got.startswith(b"HTTP/1.1 408 "), got[:60]
        assert time.monotonic() - start >= HEADER_TIMEOUT - 0.1


def kernel_responses(server: Server) -> int:
    """Answers the kernel path of a kernel server has sent so far (its pinned stats map)."""
    from fileserver_ctl import libbpf
    from fileserver_ctl.libbpf import Abi

    index = Abi(config.ABI_HEADER).enum("fs_stat")["FS_STAT_RESPONSES"]
    stats = libbpf.Map.from_pin(config.pin_dir(server.port) / "stats")
    try:
        return sum(int.from_bytes(v[:8], "little") for v in stats[index.to_bytes(4, "little")])
    finally:
        stats.close()


def fetch_until_cached(server: Server, url: str, body: bytes, timeout: float = 10.0) -> Response:
    """GET url (each answer must be `body`) until the server answers it from memory: the
    user-space server from its first answer on; the kernel server once its kernel path does,
    which is some time after user space first served the file (a file is admitted once its
    ctime is cache_policy.SETTLE_NS old). Fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        before = kernel_responses(server) if server.kind == "kernel" else 0
        resp = fetch(server.port, url)
        assert resp.status == 200 and resp.body == body, (resp.status, resp.body)
        if server.kind != "kernel" or kernel_responses(server) == before + 1:
            return resp
        assert time.monotonic() < deadline, f"{url} not answered by the kernel within {timeout} s"
        time.sleep(0.01)


def test_cached_file_changes_are_seen_at_once(server: Server):
    """Each version is in the server's memory (for the kernel server: answered by the kernel
    path) before the file changes, and the very next request gets the change. Without the wait
    the kernel cached a version only when the machine was slow enough for a step to outlast the
    settle delay, so the kernel's side of this was checked by chance."""
    path = server.docroot / "mutable" / f"m-{server.kind}.txt"
    url = f"/mutable/{path.name}"
    path.write_bytes(b"version one\n")
    first = fetch(server.port, url)
    assert first.body == b"version one\n"
    fetch_until_cached(server, url, b"version one\n")
    path.write_bytes(b"version two, longer\n")  # in place (O_TRUNC), longer
    second = fetch(server.port, url)
    assert second.body == b"version two, longer\n"
    assert second.header("ETag") != first.header("ETag")
    fetch_until_cached(server, url, b"version two, longer\n")
    st = os.stat(path)
    same_size = b"version 3, same size\n"[:st.st_size]
    path.write_bytes(same_size)  # in place, same size, mtime moved on by 1 ms
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fetch(server.port, url).body == same_size
    fetch_until_cached(server, url, same_size)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(b"replaced by rename\n")
    os.replace(tmp, path)
    assert fetch(server.port, url).body == b"replaced by rename\n"
    fetch_until_cached(server, url, b"replaced by rename\n")
    path.unlink()
    assert fetch(server.port, url).status == 404
    path.write_bytes(b"back\n")
    assert fetch(server.port, url).body == b"back\n"


def test_precompressed_sibling_appearing_later(server: Server):
    base = server.docroot / "mutable" / f"late-{server.kind}.css"
    base.write_bytes(b"a { }\n")
    url = f"/mutable/{base.name}"
    assert fetch(server.port, url, headers={"Accept-Encoding": "gzip"}).header("Vary") is None
    gz = base.with_name(base.name + ".gz")
    gz.write_bytes(b"\x1f\x8bfake")
    time.sleep(1.1)  # siblings are looked for at most once a second
    resp = fetch(server.port, url, headers={"Accept-Encoding": "gzip"})
    assert resp.body == b"\x1f\x8bfake" and resp.header("Vary") == "Accept-Encoding"


# --- what only the user-space server has ---------------------------------------------------

def test_worker_processes_and_restart(user_server: Server):
    workers = user_server.workers()
    assert len(workers) == 2
    victim = sorted(workers)[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = user_server.workers()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.05)
    assert len(user_server.workers()) == 2 and victim not in user_server.workers()
    for _ in range(20):  # both sockets of the group answer again
        assert fetch(user_server.port, "/small.txt").status == 200


def test_on_served_reports_each_file_once(user_server: Server):
    for _ in range(5):
        assert fetch(user_server.port, "/sub/page.txt").status == 200
    assert fetch(user_server.port, "/sub/").status == 200
    assert fetch(user_server.port, "/big.bin", headers={"Range": "bytes=0-1"}).status == 206
    time.sleep(0.1)
    lines = user_server.served_log.read_text().splitlines()
    size = (user_server.docroot / "sub" / "page.txt").stat().st_size
    assert f"sub/page.txt {size}" in lines
    assert 1 <= lines.count(f"sub/page.txt {size}") <= 2  # at most once per worker
    assert any(line.startswith("sub/index.html ") for line in lines)
    assert not any(line.startswith("big.bin") for line in lines)  # a 206 is not a whole file


def test_port_in_use_raises_eaddrinuse(docroot: Path):
    from fileserver_ctl.server import serve

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError) as info:
            serve(config.Settings(port=port, docroot=docroot, workers=1))
        assert info.value.errno == errno.EADDRINUSE


def test_second_server_on_same_port_is_refused(user_server: Server, docroot: Path):
    from fileserver_ctl.server import serve

    with pytest.raises(OSError) as info:  # SO_REUSEPORT must not let it join the first's group
        serve(config.Settings(port=user_server.port, docroot=docroot, workers=1))
    assert info.value.errno == errno.EADDRINUSE


def test_sigterm_stops_everything_with_status_0(docroot: Path, tmp_path: Path):
    srv = start_user_server(docroot, tmp_path, workers=3)
    workers = srv.workers()
    assert len(workers) == 3
    assert fetch(srv.port, "/small.txt").status == 200
    assert srv.stop() == 0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", srv.port), timeout=1)


def test_access_log_combined_format(docroot: Path, tmp_path: Path):
    log = tmp_path / "access.log"
    srv = start_user_server(docroot, tmp_path, workers=1, access_log=str(log))
    try:
        fetch(srv.port, "/small.txt", headers={"User-Agent": "tester/1.0", "Referer": "http://r/"})
        fetch(srv.port, "/missing", "HEAD")
        raw_exchange(srv.port, b"GARBAGE\r\n\r\n")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(log.read_text().splitlines()) < 3:
            time.sleep(0.1)
    finally:
        assert srv.stop() == 0
    lines = log.read_text().splitlines()
    size = (docroot / "small.txt").stat().st_size
    pattern = (r'127\.0\.0\.1 - - \[\d\d/\w\w\w/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] '
               r'"GET /small\.txt HTTP/1\.1" 200 %d "http://r/" "tester/1\.0"' % size)
    assert re.match(pattern, lines[0]), lines[0]
    assert '"HEAD /missing HTTP/1.1" 404 0 "-" "-"' in lines[1]
    assert '"-" 400 ' in lines[2]


def test_autoindex_lists_visible_names(docroot: Path, tmp_path: Path):
    srv = start_user_server(docroot, tmp_path, workers=1, autoindex=True)
    try:
        resp = fetch(srv.port, "/noindex/")
        assert resp.status == 200 and resp.header("Content-Type") == "text/html; charset=utf-8"
        assert b'<a href="a.txt">a.txt</a>' in resp.body
        root = fetch(srv.port, "/dirlink_out/")
        assert root.status == 404
        top = fetch(srv.port, "/sub/deeper/")
        assert b"leaf.txt" in top.body and b".hidden" not in top.body
    finally:
        assert srv.stop() == 0
