"""Differential test: the same raw requests to nginx and to this server, on both answer paths.

nginx (configured as the benchmarks configure it, bench/nginx_conf.py) serves the same docroot.
Every case of CASES goes out over a raw socket exactly as written, to nginx and to this server
with the kernel fast path (`fsctl up`) and without it (`fsctl up -n`). What a client can rely on
is compared (see `observe`): status, Content-Length/Type/Range, Last-Modified, ETag presence,
Accept-Ranges, Location's path, a close announced, whether the connection persists, and the body
of 200/206 answers. Cosmetic fields are not: Server, Date, the ETag's format, error page HTML.

Each case states nginx's status codes, so the reference is pinned too. Where this server
deliberately answers otherwise (nginx breaks an RFC 9110/9112 requirement, or its default
configuration exposes what this server hides), the case gives our status codes and the reason;
then both paths must give exactly those, and the kernel path must still match user space.
Differences that hold for every case are checked in `test_matches_nginx` itself:
  - a 405 carries `Allow: GET, HEAD` (RFC 9110 §15.5.6 MUST; nginx sends none);
  - a redirect's Location may be relative (RFC 9110 §10.2.2); only its path is compared;
  - text types carry `; charset=utf-8`; only the media type is compared.
A case may also say that nginx closes the connection where this server keeps it (`keeps_open`:
nginx ends it after a 412 without saying so), or which media type we send (`ours_type`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from servers import pick_port, start_ours
from harness import stop, wait_http
from nginx_conf import start_nginx

READ_TIMEOUT = 5.0  # seconds a silent server is waited for before the case records "timeout"
MTIME = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT, every file's mtime
LM = "Sun, 06 Nov 1994 08:49:37 GMT"
OLDER = "Sat, 05 Nov 1994 08:49:37 GMT"
NEWER = "Mon, 07 Nov 1994 08:49:37 GMT"
SMALL = b"hello, world\n" * 7
# Sent after the case's answers: an answer means the connection persisted, EOF that it closed.
PROBE = b"GET /small.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


# --- the docroot ----------------------------------------------------------------------------

def build_docroot(base: Path) -> Path:
    """Files for every case; nginx's worker runs as an unprivileged user, so all is world-readable
    except the file that must not be."""
    root, outside = base / "www", base / "outside"
    files = {
        "index.html": b"<!doctype html><title>root</title>\n",
        "small.txt": SMALL,
        "f1k.bin": bytes(range(256)) * 4,
        "big.bin": bytes(range(251)) * 2000,  # larger than the kernel cache's single-packet size
        "empty.txt": b"",
        "style.css": b"body { color: red }\n",
        "data.json": b'{"a": 1}\n',
        "noext": b"\x00\x01binary",
        "space name.txt": b"space\n",
        "ünïcödé €.txt": "utf-8 name ✓\n".encode(),
        ".hidden": b"secret\n",
        "sub/index.html": b"<p>sub index</p>\n",
        "sub/page.txt": b"sub page\n",
        "noindex/a.txt": b"a\n",
        "unreadable.txt": b"no read permission for others\n",
        "app.js": b"console.log('identity');\n" * 20,
        "app.js.gz": b"\x1f\x8b not really gzip",
        "logo.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>\n",
        "pic.png": b"\x89PNG\r\n\x1a\n",
        "page.htm": b"<p>htm</p>\n",
        "a.tar.gz": b"\x1f\x8b tarball",
        "doc.pdf": b"%PDF-1.4\n",
        "font.woff2": b"wOF2",
        "UPPER.TXT": b"upper\n",
        "private/in.txt": b"behind a directory others may not search\n",
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside the docroot\n")
    (root / "link_in.txt").symlink_to("small.txt")
    (root / "link_out.txt").symlink_to(outside / "secret.txt")
    for path in [*root.rglob("*"), root, outside / "secret.txt"]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
            os.utime(path, (MTIME, MTIME))
    (root / "unreadable.txt").chmod(0o000)  # as root: no read permission for others
    (root / "private").chmod(0o700)  # others may not search it: what is inside is out of reach
    base.chmod(0o755)
    return root


def add_file(root: Path, name: str, data: bytes, mtime: float = MTIME) -> None:
    """One more file of the docroot for a test's own cases, as build_docroot makes them:
    world-readable, in folders others may search, dated MTIME (the file itself `mtime`)."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)
    os.utime(path, (MTIME, mtime))
    for folder in path.relative_to(root).parents:
        (root / folder).chmod(0o755)
        os.utime(root / folder, (MTIME, MTIME))


# --- one exchange, reduced to what must match -----------------------------------------------

@dataclass(frozen=True)
class Seen:
    """What one connection got: the normalised answers, and whether it stayed open after them."""
    answers: tuple[tuple, ...]
    persists: bool | None  # None: the server neither answered nor closed within READ_TIMEOUT

    @property
    def statuses(self) -> tuple[int, ...]:
        return tuple(a[0] for a in self.answers)


def _media_type(value: str | None) -> str | None:
    return None if value is None else value.split(";")[0].strip().lower()


def _multipart_parts(body: bytes, ctype: str) -> tuple:
    """(Content-Type, Content-Range, data) of each part: the boundary itself differs."""
    boundary = re.search(r"boundary=(\S+)", ctype).group(1).encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(line.split(b": ", 1) for line in head.strip().split(b"\r\n"))
        parts.append((_media_type(fields[b"Content-Type"].decode()),
                      fields[b"Content-Range"].decode(), data.removesuffix(b"\r\n")))
    return tuple(parts)


def _normalise(status: int, headers: dict[str, list[str]], body: bytes, head_only: bool) -> tuple:
    one = lambda name: (headers.get(name) or [None])[-1]  # noqa: E731
    close = any("close" in v.lower() for v in headers.get("connection", []))
    common = (("last-modified", one("last-modified")), ("etag", "etag" in headers),
              ("content-range", one("content-range")), ("connection-close", close))
    if status in (200, 206):
        ctype = one("content-type")
        if ctype and ctype.startswith("multipart/byteranges"):
            payload = ("parts", _multipart_parts(body, ctype))
            length = None  # depends on the boundary's length
        else:
            payload = ("body", body)
            length = one("content-length")
        return (status, ("content-type", _media_type(ctype)), ("content-length", length),
                ("accept-ranges", one("accept-ranges")), *common, payload)
    if status == 304:
        return (status, ("content-length", one("content-length")), *common)
    location = one("location")
    if location is not None:
        parts = urlsplit(location)
        location = parts.path + (f"?{parts.query}" if parts.query else "")
    return (status, ("location", location), *common, ("allow", one("allow")))


class Reader:
    """Answers off one socket, framed as RFC 9112 §6.3 says (a HEAD answer has no body)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buf, self.eof = sock, b"", False

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        self.eof = not chunk
        self.buf += chunk
        return bool(chunk)

    def answer(self, head_only: bool) -> tuple[int, dict, bytes] | None:
        """The next answer (status 9 for an HTTP/0.9 body without a head), None at EOF."""
        while b"\r\n\r\n" not in self.buf:
            if self.buf and not b"HTTP/".startswith(self.buf[:5]):
                while self._fill():
                    pass
                body, self.buf = self.buf, b""
                return 9, {}, body
            if not self._fill():
                return None
        end = self.buf.index(b"\r\n\r\n") + 4
        head, self.buf = self.buf[:end].decode("latin-1"), self.buf[end:]
        lines = head[:-4].split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.setdefault(name.lower(), []).append(value.strip())
        if head_only or status < 200 or status in (204, 304):
            return status, headers, b""
        length = int(headers["content-length"][-1])
        while len(self.buf) < length and self._fill():
            pass
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def observe(port: int, data: bytes, heads: tuple[bool, ...]) -> Seen:
    """Send `data`, read one final answer per entry of `heads` (True: a HEAD), then PROBE."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        reader = Reader(sock)
        try:
            sock.sendall(data)
            pending = list(heads)
            while pending:
                got = reader.answer(pending[0])
                if got is None:
                    break
                answers.append(_normalise(*got, pending[0]))
                if got[0] >= 200:
                    pending.pop(0)
                if got[0] == 9:
                    break
            persists = False
            if not reader.eof and not reader.buf:
                try:
                    sock.sendall(PROBE)
                    persists = reader.answer(False) is not None
                except (BrokenPipeError, ConnectionResetError):
                    pass
        except socket.timeout:
            persists = None
    return Seen(tuple(answers), persists)


# --- the cases --------------------------------------------------------------------------------

def r(line: str, *headers: str, host: str | None = "localhost", body: bytes = b"") -> bytes:
    """A request written out: request line, Host (unless None), headers, blank line, body."""
    lines = [line, *([f"Host: {host}"] if host is not None else []), *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    nginx: tuple[int, ...]  # nginx's final status codes (9: an HTTP/0.9 answer, no head)
    heads: tuple[bool, ...] | None = None  # per answer: a HEAD (default: from the method)
    ours: tuple[int, ...] | None = None  # set when this server deliberately differs...
    why: str = ""  # ...and why
    compare: bool = True  # False: nothing beyond the status codes is comparable
    etag: bool = False  # data holds {etag}: the server's own ETag of /small.txt goes there
    keeps_open: bool = False  # nginx closes after it unannounced; we keep the connection
    ours_type: str = ""  # the media type we send where nginx's table names another

    def answers(self) -> tuple[bool, ...]:
        return self.heads or (self.data.startswith(b"HEAD "),)


G = "GET {} HTTP/1.1"
H = "HEAD {} HTTP/1.1"
CASES = [
    # hits, misses, indexes, redirects
    Case("get-hit", r(G.format("/small.txt")), (200,)),
    Case("head-hit", r(H.format("/small.txt")), (200,)),
    Case("get-miss", r(G.format("/missing.txt")), (404,)),
    Case("head-miss", r(H.format("/missing.txt")), (404,)),
    Case("get-big", r(G.format("/big.bin")), (200,)),
    Case("get-empty", r(G.format("/empty.txt")), (200,)),
    Case("types", r(G.format("/style.css")), (200,)),
    Case("type-json", r(G.format("/data.json")), (200,)),
    Case("type-none", r(G.format("/noext")), (200,)),
    Case("type-js", r(G.format("/app.js")), (200,), ours_type="text/javascript",
         why="RFC 9239 §6: text/javascript; application/javascript is obsolete"),
    Case("type-svg", r(G.format("/logo.svg")), (200,)),
    Case("type-png", r(G.format("/pic.png")), (200,)),
    Case("type-htm", r(G.format("/page.htm")), (200,)),
    Case("type-tar-gz", r(G.format("/a.tar.gz")), (200,), ours_type="application/gzip",
         why="mimetypes knows RFC 6713's application/gzip; nginx's mime.types lacks .gz"),
    Case("type-pdf", r(G.format("/doc.pdf")), (200,)),
    Case("type-woff2", r(G.format("/font.woff2")), (200,)),
    Case("type-upper-ext", r(G.format("/UPPER.TXT")), (200,)),
    Case("precompressed", r(G.format("/app.js"), "Accept-Encoding: gzip"), (200,), compare=False,
         why="issue 3 (owners): app.js.gz is sent with Content-Encoding (nginx: gzip_static off)"),
    Case("index-file", r(G.format("/index.html")), (200,)),
    Case("index-sub-query", r(G.format("/sub/?q=1")), (200,)),
    Case("dot-segment-single", r(G.format("/./sub/./page.txt")), (200,)),
    Case("double-encoded", r(G.format("/%252e%252e/small.txt")), (404,)),
    Case("encoded-dot-file", r(G.format("/sub/%2e/page.txt")), (200,)),
    Case("index-root", r(G.format("/")), (200,)),
    Case("index-sub", r(G.format("/sub/")), (200,)),
    Case("head-index-sub", r(H.format("/sub/")), (200,)),
    Case("dir-no-slash", r(G.format("/sub")), (301,)),
    Case("dir-no-slash-query", r(G.format("/sub?a=1")), (301,)),
    Case("head-dir-no-slash", r(H.format("/sub")), (301,)),
    Case("dir-without-index", r(G.format("/noindex/")), (403,), ours=(404,), compare=False,
         why="issue 3 (owners): a folder without index.html is 404, telling nothing"),
    Case("file-with-slash", r(G.format("/small.txt/")), (404,)),
    Case("double-slash", r(G.format("//small.txt")), (200,)),
    Case("dot-segments", r(G.format("/sub/../small.txt")), (200,)),
    # percent-encoding and names
    Case("pct-dotdot-inside", r(G.format("/sub/%2e%2e/small.txt")), (200,)),
    Case("pct-dotdot-escape", r(G.format("/%2e%2e/%2e%2e/etc/passwd")), (400,), ours=(404,),
         compare=False, why="issue 3 (owners): a path leaving the docroot is 404, telling nothing"),
    Case("dotdot-escape", r(G.format("/../../etc/passwd")), (400,), ours=(404,), compare=False,
         why="issue 3 (owners): a path leaving the docroot is 404, telling nothing"),
    Case("pct-slash", r(G.format("/sub%2Fpage.txt")), (200,)),
    Case("pct-nul", r(G.format("/small.txt%00.html")), (400,), ours=(404,), compare=False,
         why="issue 3 (owners): a NUL byte in the path is 404, telling nothing"),
    Case("pct-invalid", r(G.format("/small%zz.txt")), (400,)),
    Case("pct-truncated", r(G.format("/small.txt%")), (400,)),
    Case("pct-plain", r(G.format("/sm%61ll.txt")), (200,)),
    Case("pct-space", r(G.format("/space%20name.txt")), (200,)),
    Case("utf8-encoded", r(G.format("/%C3%BCn%C3%AFc%C3%B6d%C3%A9%20%E2%82%AC.txt")), (200,)),
    Case("utf8-raw", r(G.format("/ünïcödé%20€.txt")), (200,)),
    # query, fragment, target forms
    Case("query", r(G.format("/small.txt?x=1&y")), (200,)),
    Case("query-empty", r(G.format("/small.txt?")), (200,)),
    Case("fragment", r(G.format("/small.txt#frag")), (200,)),
    Case("absolute-form", r(G.format("http://localhost/small.txt")), (200,)),
    Case("absolute-form-other-host", r(G.format("http://example.com/small.txt")), (200,)),
    Case("absolute-form-no-path", r(G.format("http://localhost")), (200,)),
    Case("asterisk-get", r(G.format("*")), (400,)),
    Case("asterisk-options", r("OPTIONS * HTTP/1.1"), (400,), ours=(405,), compare=False,
         why="RFC 9110 §9.3.7: OPTIONS * is a valid request; 405 with Allow answers it"),
    Case("relative-target", r(G.format("small.txt")), (400,)),
    Case("absolute-form-upper", r(G.format("HTTP://LOCALHOST/small.txt")), (200,)),
    Case("absolute-form-https", r(G.format("https://localhost/small.txt")), (200,)),
    Case("absolute-form-query", r(G.format("http://localhost/small.txt?a#b")), (200,)),
    Case("host-with-port", r(G.format("/small.txt"), host="localhost:80"), (200,)),
    Case("host-trailing-dot", r(G.format("/small.txt"), host="localhost."), (200,)),
    Case("host-ipv6", r(G.format("/small.txt"), host="[::1]:8080"), (200,)),
    Case("host-upper", r(G.format("/small.txt"), host="LOCALHOST"), (200,)),
    # methods
    Case("options", r("OPTIONS /small.txt HTTP/1.1"), (405,)),
    Case("post", r("POST /small.txt HTTP/1.1", "Content-Length: 0"), (405,)),
    Case("post-miss", r("POST /missing.txt HTTP/1.1", "Content-Length: 0"), (404,),
         ours=(405,), why="the method is refused before the path is looked up: GET/HEAD only"),
    Case("put", r("PUT /small.txt HTTP/1.1", "Content-Length: 2", body=b"hi"), (405,)),
    Case("delete", r("DELETE /small.txt HTTP/1.1"), (405,)),
    Case("trace", r("TRACE /small.txt HTTP/1.1"), (405,)),
    Case("patch", r("PATCH /small.txt HTTP/1.1", "Content-Length: 0"), (405,)),
    Case("unknown-method", r("FOO /small.txt HTTP/1.1"), (405,), ours=(501,),
         why="RFC 9110 §9.1: an unrecognised method SHOULD get 501, nginx says 405"),
    Case("lower-case-method", r("get /small.txt HTTP/1.1"), (400,)),
    # versions, Host
    Case("http10-host", r("GET /small.txt HTTP/1.0"), (200,)),
    Case("http10-no-host", r("GET /small.txt HTTP/1.0", host=None), (200,)),
    Case("http10-keep-alive", r("GET /small.txt HTTP/1.0", "Connection: keep-alive"), (200,)),
    Case("http11-no-host", r("GET /small.txt HTTP/1.1", host=None), (400,)),
    Case("two-hosts", r(G.format("/small.txt"), "Host: other"), (400,)),
    Case("empty-host", r(G.format("/small.txt"), host=""), (400,)),
    Case("bad-host", r(G.format("/small.txt"), host="a/b"), (400,)),
    Case("http2-line", r("GET /small.txt HTTP/2.0"), (505,)),
    Case("http12-line", r("GET /small.txt HTTP/1.2"), (200,)),
    Case("http09-line", b"GET /small.txt\r\n", (9,), ours=(400,),
         why="HTTP/0.9 is obsolete (RFC 9112 §C.1): a request line without version is refused"),
    Case("garbage-line", b"\x16\x03\x01\x00\xa5\x01\x00\x00\r\n\r\n", (400,)),
    Case("garbage-words", b"HELLO THERE\r\n\r\n", (400,)),
    Case("bad-version", r("GET /small.txt HTTP/x.y"), (400,)),
    Case("space-in-target", r("GET /space name.txt HTTP/1.1"), (400,)),
    Case("two-spaces", b"GET  /small.txt  HTTP/1.1\r\nHost: localhost\r\n\r\n", (200,)),
    Case("tab-separator", b"GET\t/small.txt\tHTTP/1.1\r\nHost: localhost\r\n\r\n", (400,)),
    Case("trailing-space-line", b"GET /small.txt HTTP/1.1 \r\nHost: localhost\r\n\r\n", (200,),
         ours=(400,), compare=False,
         why="RFC 9112 §3: no space may follow the version; an invalid request-line gets 400"),
    Case("header-obs-text", r(G.format("/small.txt"), "X-A: caf\u00e9"), (200,)),
    Case("header-underscore", r(G.format("/small.txt"), "X_A: b"), (200,)),
    Case("header-nul", r(G.format("/small.txt"), "X-A: a\x00b"), (400,)),
    Case("header-empty-value", r(G.format("/small.txt"), "X-A:"), (200,)),
    Case("header-leading-space", b"GET /small.txt HTTP/1.1\r\n Host: localhost\r\n\r\n", (400,)),
    Case("expect-other", r(G.format("/small.txt"), "Expect: something"), (200,)),
    Case("head-with-body", r(H.format("/small.txt"), "Content-Length: 3", body=b"abc"), (200,)),
    Case("content-length-zero", r(G.format("/small.txt"), "Content-Length: 0"), (200,)),
    Case("bare-lf", b"GET /small.txt HTTP/1.1\nHost: localhost\n\n", (200,)),
    Case("leading-empty-lines", b"\r\n\r\n" + r(G.format("/small.txt")), (200,)),
    Case("header-no-colon", r(G.format("/small.txt"), "NoColon"), (200,), ours=(400,),
         compare=False, why="RFC 9112 §5: a field line without a colon is invalid (nginx drops it)"),
    Case("header-space-before-colon", r(G.format("/small.txt"), "X-A : b"), (400,)),
    Case("obs-fold", r(G.format("/small.txt"), "X-A: b", " folded"), (400,)),
    # Range (RFC 9110 §14)
    Case("range-single", r(G.format("/small.txt"), "Range: bytes=0-4"), (206,)),
    Case("range-suffix", r(G.format("/small.txt"), "Range: bytes=-5"), (206,)),
    Case("range-open", r(G.format("/small.txt"), "Range: bytes=80-"), (206,)),
    Case("range-past-end", r(G.format("/small.txt"), "Range: bytes=80-1000"), (206,)),
    Case("range-multi", r(G.format("/small.txt"), "Range: bytes=0-1,5-7"), (206,)),
    Case("range-multi-big", r(G.format("/big.bin"), "Range: bytes=0-9,100000-100009"), (206,)),
    Case("range-unsatisfiable", r(G.format("/small.txt"), "Range: bytes=1000-"), (416,)),
    Case("range-zero-suffix", r(G.format("/small.txt"), "Range: bytes=-0"), (416,)),
    Case("range-malformed", r(G.format("/small.txt"), "Range: bytes=a-b"), (416,)),
    Case("range-backwards", r(G.format("/small.txt"), "Range: bytes=5-1"), (416,)),
    Case("range-other-unit", r(G.format("/small.txt"), "Range: pages=1-2"), (200,)),
    Case("range-empty-file", r(G.format("/empty.txt"), "Range: bytes=0-"), (200,)),
    Case("range-head", r(H.format("/small.txt"), "Range: bytes=0-4"), (206,), ours=(200,),
         why="RFC 9110 §14.2: Range MUST be ignored for methods other than GET (nginx serves 206)"),
    Case("range-overlap", r(G.format("/small.txt"), "Range: bytes=0-50,40-90"), (200,)),
    Case("range-whole-in-parts", r(G.format("/small.txt"), "Range: bytes=0-45,46-90"), (206,)),
    Case("range-first-byte", r(G.format("/small.txt"), "Range: bytes=0-0"), (206,)),
    Case("range-last-byte", r(G.format("/small.txt"), "Range: bytes=-1"), (206,)),
    Case("range-suffix-larger", r(G.format("/small.txt"), "Range: bytes=-1000"), (206,)),
    Case("range-empty-file-0-0", r(G.format("/empty.txt"), "Range: bytes=0-0"), (200,)),
    Case("range-empty-file-suffix", r(G.format("/empty.txt"), "Range: bytes=-5"), (200,)),
    Case("range-one-bad-one-good", r(G.format("/small.txt"), "Range: bytes=1000-2000,0-1"), (206,)),
    Case("range-spaces", r(G.format("/small.txt"), "Range: bytes= 0-1 , 3-4"), (206,)),
    Case("range-upper-unit", r(G.format("/small.txt"), "Range: BYTES=0-1"), (206,)),
    Case("range-on-404", r(G.format("/missing"), "Range: bytes=0-1"), (404,)),
    Case("range-on-index", r(G.format("/"), "Range: bytes=0-4"), (206,)),
    Case("if-range-weak", r(G.format("/small.txt"), "Range: bytes=0-4", "If-Range: W/{etag}"),
         (200,), etag=True),
    Case("range-big", r(G.format("/big.bin"), "Range: bytes=400000-400099"), (206,)),
    Case("if-range-etag-match", r(G.format("/small.txt"), "Range: bytes=0-4", "If-Range: {etag}"),
         (206,), etag=True),
    Case("if-range-etag-other", r(G.format("/small.txt"), "Range: bytes=0-4", 'If-Range: "x"'),
         (200,)),
    Case("if-range-date-match", r(G.format("/small.txt"), "Range: bytes=0-4", f"If-Range: {LM}"),
         (206,)),
    Case("if-range-date-other", r(G.format("/small.txt"), "Range: bytes=0-4",
                                  f"If-Range: {OLDER}"), (200,)),
    # conditionals (RFC 9110 §13)
    Case("inm-match", r(G.format("/small.txt"), "If-None-Match: {etag}"), (304,), etag=True),
    Case("inm-match-head", r(H.format("/small.txt"), "If-None-Match: {etag}"), (304,), etag=True),
    Case("inm-star", r(G.format("/small.txt"), "If-None-Match: *"), (304,)),
    Case("inm-weak", r(G.format("/small.txt"), "If-None-Match: W/{etag}"), (304,), etag=True),
    Case("inm-list", r(G.format("/small.txt"), 'If-None-Match: "a", {etag}, "b"'), (304,),
         etag=True),
    Case("inm-other", r(G.format("/small.txt"), 'If-None-Match: "other"'), (200,)),
    Case("inm-on-404", r(G.format("/missing"), "If-None-Match: *"), (404,)),
    Case("inm-match-range", r(G.format("/small.txt"), "If-None-Match: {etag}", "Range: bytes=0-1"),
         (304,), etag=True),
    Case("ims-on-head", r(H.format("/small.txt"), f"If-Modified-Since: {LM}"), (304,)),
    Case("ims-rfc850", r(G.format("/small.txt"), "If-Modified-Since: Sunday, 06-Nov-94 08:49:37 GMT"),
         (304,)),
    Case("ims-asctime", r(G.format("/small.txt"), "If-Modified-Since: Sun Nov  6 08:49:37 1994"),
         (304,)),
    Case("if-match-star-missing", r(G.format("/missing"), "If-Match: *"), (404,)),
    Case("if-match-weak", r(G.format("/small.txt"), "If-Match: W/{etag}"), (412,), etag=True,
         keeps_open=True),
    Case("ims-equal", r(G.format("/small.txt"), f"If-Modified-Since: {LM}"), (304,)),
    Case("ims-older", r(G.format("/small.txt"), f"If-Modified-Since: {OLDER}"), (200,)),
    Case("ims-newer", r(G.format("/small.txt"), f"If-Modified-Since: {NEWER}"), (200,),
         ours=(304,), compare=False,
         why="RFC 9110 §13.1.3: not modified since a later date is 304 (nginx's default is exact)"),
    Case("ims-invalid", r(G.format("/small.txt"), "If-Modified-Since: yesterday"), (200,)),
    Case("ims-with-inm-other", r(G.format("/small.txt"), 'If-None-Match: "x"',
                                 f"If-Modified-Since: {LM}"), (200,)),
    Case("if-match-star", r(G.format("/small.txt"), "If-Match: *"), (200,)),
    Case("if-match-etag", r(G.format("/small.txt"), "If-Match: {etag}"), (200,), etag=True),
    Case("if-match-other", r(G.format("/small.txt"), 'If-Match: "other"'), (412,),
         keeps_open=True),
    Case("ius-equal", r(G.format("/small.txt"), f"If-Unmodified-Since: {LM}"), (200,)),
    Case("ius-older", r(G.format("/small.txt"), f"If-Unmodified-Since: {OLDER}"), (412,),
         keeps_open=True),
    Case("ius-invalid", r(G.format("/small.txt"), "If-Unmodified-Since: never"), (412,),
         ours=(200,), compare=False,
         why="RFC 9110 §13.1.4: an invalid If-Unmodified-Since date MUST be ignored"),
    # bodies, Expect
    Case("get-with-body", r(G.format("/small.txt"), "Content-Length: 5", body=b"hello"), (200,)),
    Case("get-chunked", r(G.format("/small.txt"), "Transfer-Encoding: chunked",
                          body=b"5\r\nhello\r\n0\r\n\r\n"), (200,)),
    Case("cl-and-chunked", r(G.format("/small.txt"), "Content-Length: 5",
                             "Transfer-Encoding: chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
         (400,)),
    Case("two-content-lengths", r(G.format("/small.txt"), "Content-Length: 1", "Content-Length: 2",
                                  body=b"ab"), (400,)),
    Case("bad-content-length", r(G.format("/small.txt"), "Content-Length: abc"), (400,)),
    Case("unknown-te", r(G.format("/small.txt"), "Transfer-Encoding: gzip"), (501,)),
    Case("te-chunked-then-gzip", r(G.format("/small.txt"), "Transfer-Encoding: chunked, gzip"),
         (501,)),
    Case("te-repeated", r(G.format("/small.txt"), "Transfer-Encoding: chunked",
                          "Transfer-Encoding: chunked", body=b"0\r\n\r\n"), (400,)),
    Case("te-http10", r("GET /small.txt HTTP/1.0", "Transfer-Encoding: chunked",
                        body=b"0\r\n\r\n"), (400,)),
    Case("expect-continue", r(G.format("/small.txt"), "Expect: 100-continue",
                              "Content-Length: 5", body=b"hello"), (100, 200), ours=(200,),
         why="RFC 9110 §10.1.1: 100 (Continue) MAY be left out when the content is there"),
    Case("post-expect-continue", r("POST /small.txt HTTP/1.1", "Expect: 100-continue",
                                   "Content-Length: 5", body=b"hello"), (405,)),
    # limits
    Case("long-header-10k", r(G.format("/small.txt"), "X-Big: " + "v" * 10000), (400,),
         ours=(200,), why="a field line up to 16 KiB is taken (nginx's default buffer is 8 KiB)"),
    Case("long-header-20k", r(G.format("/small.txt"), "X-Big: " + "v" * 20000), (400,),
         ours=(431,), why="RFC 6585 §5: 431 names the cause; nginx says 400"),
    Case("long-header-7k", r(G.format("/small.txt"), "X-Big: " + "v" * 7000), (200,)),
    Case("long-uri-7k", r(G.format("/" + "a" * 7000)), (404,)),
    Case("long-uri", r(G.format("/" + "a" * 10000)), (414,)),
    Case("many-headers", r(G.format("/small.txt"), *(f"X-H{i}: v" for i in range(200))), (200,)),
    Case("too-many-headers", r(G.format("/small.txt"), *(f"X-H{i}: {'v' * 100}" for i in range(400))),
         (400,), ours=(431,), why="RFC 6585 §5: 431 names the cause; nginx says 400"),
    # connections
    Case("pipelined", r(G.format("/small.txt")) + r(H.format("/sub/")) + r(G.format("/missing"))
         + r(G.format("/f1k.bin"), "Range: bytes=1-2"), (200, 200, 404, 206),
         heads=(False, True, False, False)),
    Case("pipelined-conditional", r(G.format("/small.txt"), f"If-Modified-Since: {LM}")
         + r(G.format("/small.txt"), "Range: bytes=-3") + r(H.format("/missing")),
         (304, 206, 404), heads=(False, False, True)),
    Case("http10-keep-alive-pipelined", r("GET /small.txt HTTP/1.0", "Connection: keep-alive")
         + r("HEAD /small.txt HTTP/1.0", "Connection: keep-alive"), (200, 200),
         heads=(False, True)),
    Case("http10-head", r("HEAD /small.txt HTTP/1.0"), (200,)),
    Case("close-on-error-keeps-going", r(G.format("/missing")) + r(G.format("/small.txt")),
         (404, 200), heads=(False, False)),
    Case("connection-close", r(G.format("/small.txt"), "Connection: close"), (200,)),
    Case("http10-close-after", r("GET /small.txt HTTP/1.0") + r(G.format("/small.txt")), (200,)),
    Case("pipelined-then-bad", r(G.format("/small.txt")) + b"BAD\r\n\r\n", (200, 400),
         heads=(False, False)),
    # Proxy-Connection is no standard field: nginx ignores it (llhttp reads it as Connection)
    Case("proxy-connection-close", r(G.format("/small.txt"), "Proxy-Connection: close"), (200,)),
    Case("proxy-connection-keep-alive", r(G.format("/small.txt"), "Proxy-Connection: keep-alive"),
         (200,)),
    Case("proxy-connection-close-pipelined", r(G.format("/small.txt"), "Proxy-Connection: close")
         + r(H.format("/small.txt"), "proxy-connection: Close"), (200, 200), heads=(False, True)),
    Case("proxy-connection-close-then-bad", r(G.format("/small.txt"), "Proxy-Connection: close")
         + b"BAD\r\n\r\n", (200, 400), heads=(False, False)),
    Case("proxy-connection-close-with-keep-alive", r(G.format("/small.txt"), "Connection: keep-alive",
                                                     "Proxy-Connection: close"), (200,)),
    Case("proxy-connection-keep-alive-with-close", r(G.format("/small.txt"), "Connection: close",
                                                     "Proxy-Connection: keep-alive"), (200,)),
    Case("http10-proxy-connection-keep-alive", r("GET /small.txt HTTP/1.0",
                                                 "Proxy-Connection: keep-alive"), (200,)),
    Case("http10-proxy-connection-close", r("GET /small.txt HTTP/1.0", "Proxy-Connection: close"),
         (200,)),
    Case("http10-keep-alive-proxy-connection-close", r("GET /small.txt HTTP/1.0",
                                                       "Connection: keep-alive",
                                                       "Proxy-Connection: close"), (200,)),
    # what stays private
    Case("hidden-file", r(G.format("/.hidden")), (200,), ours=(404,), compare=False,
         why="dot files are never served (nginx serves them unless told not to)"),
    Case("symlink-inside", r(G.format("/link_in.txt")), (200,)),
    Case("symlink-outside", r(G.format("/link_out.txt")), (200,), ours=(404,), compare=False,
         why="symlinks leading out of the docroot are not followed (nginx: disable_symlinks off)"),
    Case("unreadable", r(G.format("/unreadable.txt")), (403,)),
    Case("head-unreadable", r(H.format("/unreadable.txt")), (403,)),
    Case("unsearchable-dir-file", r(G.format("/private/in.txt")), (403,)),
    Case("unsearchable-dir-missing", r(G.format("/private/missing.txt")), (403,)),
    Case("unsearchable-dir-index", r(G.format("/private/")), (403,)),
    Case("unsearchable-dir-no-slash", r(G.format("/private")), (403,)),
]


# --- servers --------------------------------------------------------------------------------

@contextmanager
def temporary_docroot(prefix: str, build: Callable[[Path], Path] = build_docroot) -> Iterator[Path]:
    """The docroot `build` makes in a new directory under /tmp (reachable by nginx's worker
    user), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield build(base)
    finally:
        (base / "www" / "unreadable.txt").chmod(0o644)
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def docroot() -> Iterator[Path]:
    with temporary_docroot("parity-") as root:
        yield root


@pytest.fixture(scope="module")
def nginx(docroot: Path) -> int:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        pytest.skip("nginx is not installed")
    port = pick_port()
    tmp = Path(tempfile.mkdtemp(prefix="parity-nginx-"))
    proc = start_nginx(docroot, "127.0.0.1", port, tmp)
    try:
        try:
            wait_http("127.0.0.1", port, "small.txt", proc)
        except SystemExit as exc:
            pytest.skip(f"nginx did not start: {exc}")
        yield port
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module", params=["user", pytest.param("kernel", marks=pytest.mark.bpf)])
def ours(request: pytest.FixtureRequest, docroot: Path) -> tuple[str, int]:
    """This server on one of its paths: `fsctl up -n` (user) or `fsctl up` (kernel)."""
    kind = request.param
    port, server = start_ours(kind, docroot)
    try:
        yield kind, port
    finally:
        assert server.stop() == 0, "".join(server.output)
        assert "Traceback" not in "".join(server.output)


_seen: dict[tuple, Seen] = {}  # (server, case id) -> what it got; nginx and user are reused
_etags: dict[int, str] = {}


def _etag(port: int) -> str:
    if port not in _etags:
        with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
            sock.sendall(r(H.format("/small.txt"), "Connection: close"))
            _, headers, _ = Reader(sock).answer(True)
        _etags[port] = headers["etag"][0]
    return _etags[port]


def seen(server: str, port: int, case: Case) -> Seen:
    key = (server, case.id)
    if key not in _seen:
        data = case.data.replace(b"{etag}", _etag(port).encode()) if case.etag else case.data
        _seen[key] = observe(port, data, case.answers())
    return _seen[key]


def _as_we_answer(reference: Seen, case: Case) -> Seen:
    """nginx's answers as this server must give them: a 405 with the Allow nginx omits, the
    connection kept where nginx closes unannounced, the case's media type where it differs."""
    def fix(status: int, field):
        if isinstance(field, tuple) and field[0] == "content-type" and case.ours_type:
            return ("content-type", case.ours_type)
        if status == 405 and field == ("allow", None):
            return ("allow", "GET, HEAD")
        return field
    answers = tuple(tuple(fix(a[0], f) for f in a) for a in reference.answers)
    # RFC 9112 §9.3: persistence is the default in HTTP/1.1
    return Seen(answers, True if case.keeps_open else reference.persists)


def assert_like_nginx(case: Case, nginx: int, ours: tuple[str, int], *, persistence: bool = False) -> None:
    """Our answers to case are nginx's (as we answer them: _as_we_answer), or case.ours where
    we differ on purpose, and the kernel path's are user space's. persistence: where we differ
    on purpose, whether the connection stays open is still compared (case.keeps_open or nginx's)."""
    kind, port = ours
    reference = seen("nginx", nginx, case)
    got = seen(kind, port, case)
    assert reference.statuses == case.nginx, f"nginx changed: {reference}"
    if case.ours is None:
        assert got.statuses == reference.statuses
        if case.compare:
            assert got == _as_we_answer(reference, case)
    else:
        assert got.statuses == case.ours, case.why
        if persistence and case.compare:
            assert got.persists == (True if case.keeps_open else reference.persists), case.why
    for answer in got.answers:
        if answer[0] == 405:
            assert answer[-1] == ("allow", "GET, HEAD")
    if kind == "kernel" and ("user", case.id) in _seen:
        assert got == _seen[("user", case.id)], "the kernel path differs from user space"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_nginx(case: Case, nginx: int, ours: tuple[str, int]):
    assert_like_nginx(case, nginx, ours)
