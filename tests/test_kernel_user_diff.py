"""Differential test: the kernel fast path must answer exactly as user space would, or hand off.

`fsctl up` (kernel path) and `fsctl up -n` (user space only) serve the same docroot. Requests
come from a seeded random grammar (method spelling, target forms, versions, header spelling and
whitespace, Host forms, Connection tokens, validators, ranges, codings, long lines, bare LF, a
request split over two writes, two pipelined requests) and from REGRESSIONS, the differences
this test found once. Each goes over a fresh connection and as the second request on a
keep-alive connection, to both servers; everything each server sends until it closes (a probe
with `Connection: close` ends a connection left open) must be the same bytes, Date aside.

The kernel's counters say how many cases it answered itself: a diff test where the kernel hands
everything off would prove nothing, so a share of them must be its own.

FUZZ_CASES (default 400) and FUZZ_SEED (default 9112) change the run, e.g.
`FUZZ_CASES=5000 pytest tests/test_kernel_user_diff.py` for a longer local run.
"""

from __future__ import annotations

import os
import random
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fileserver_ctl import config, libbpf, response
from fileserver_ctl.libbpf import Abi
from servers import pick_port, start_fsctl

pytestmark = pytest.mark.bpf

CASES = int(os.environ.get("FUZZ_CASES", "400"))
SEED = int(os.environ.get("FUZZ_SEED", "9112"))
TIME_BUDGET = float(os.environ.get("FUZZ_SECONDS", "60"))  # the generated cases stop after this
MIN_KERNEL_SHARE = 0.25  # of the generated exchanges to the kernel server, answered in kernel
READ_TIMEOUT = 3.0  # seconds a silent server is waited for
IPV6_EVERY = int(os.environ.get("FUZZ_IPV6_EVERY", "5"))  # every n-th connection over ::1
SPLIT_PAUSE = 0.005  # seconds between the two writes of a split request (two segments)
MTIME = 784111777  # Sun, 06 Nov 1994 08:49:37 GMT, every file's mtime
LM = "Sun, 06 Nov 1994 08:49:37 GMT"
OLDER = "Sat, 05 Nov 1994 08:49:37 GMT"
NEWER = "Mon, 07 Nov 1994 08:49:37 GMT"
SEGMENT = 15998  # bpf/fileserver.h FS_SEGMENT_MAX: the most payload one kernel segment carries
WARMUP = b"GET /k1.bin HTTP/1.1\r\nHost: localhost\r\n\r\n"
PROBE = b"GET /one.txt HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
ODD_NAME = "x!$&'()*+,=~.txt"  # every sub-delim a path segment may hold as it is


# --- the docroot ------------------------------------------------------------------------------

def _fit_segment(path: Path, extra: int) -> None:
    """Size `path` so that its keep-alive 200 answer is SEGMENT + extra bytes (head + body)."""
    date = response.http_date(time.time())
    size = SEGMENT
    for _ in range(4):  # Content-Length and the ETag depend on the size: settle it
        path.write_bytes(bytes(range(256)) * (size // 256) + b"z" * (size % 256))
        os.utime(path, (MTIME, MTIME))
        head = response.file_head(200, path.stat(), path, date)
        size = SEGMENT + extra - len(head)


def build_docroot(root: Path) -> None:
    rng = random.Random(SEED)
    files = {
        "index.html": b"<!doctype html><title>root</title>\n",
        "empty.txt": b"",
        "one.txt": b"1",
        "k1.bin": rng.randbytes(1024),
        "seg_under.bin": rng.randbytes(15_500),
        "seg_over.bin": rng.randbytes(16_500),
        "k64.bin": rng.randbytes(65_536),
        "sub/index.html": b"<p>sub index</p>\n",
        "sub/page.txt": b"sub page\n",
        "a;b.txt": b"semicolon\n",
        "a:b@c.txt": b"colon and at\n",
        ODD_NAME: b"sub-delims\n",
        "tilde~.txt": b"tilde\n",
        "space name.txt": b"space\n",
        "caf\u00e9.txt": b"utf-8 name\n",
        "UPPER.TXT": b"upper\n",
        "app.js": b"console.log('identity');\n" * 8,
        "app.js.gz": b"\x1f\x8b not really gzip",
        "style.css": b"body { color: red }\n",
        "k16.bin": rng.randbytes(16_384),  # test_sequence_diff: two segments
        "k200.bin": rng.randbytes(200 * 1024),  # many segments, past a small receive buffer
    }
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    # answers exactly one segment long with keep-alive, so one more byte (close) is two
    _fit_segment(root / "seg_edge.bin", 0)
    _fit_segment(root / "seg_edge_close.bin", -19)  # "Connection: close\r\n" fills it
    _fit_segment(root / "seg_edge6.bin", -20)  # one IPv6 segment: its header is 20 bytes longer
    for path in [*root.rglob("*"), root]:
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (MTIME, MTIME))


PATHS = ["/", "/index.html", "/empty.txt", "/one.txt", "/k1.bin", "/seg_under.bin",
         "/seg_over.bin", "/seg_edge.bin", "/seg_edge_close.bin", "/seg_edge6.bin", "/k64.bin", "/sub/", "/sub",
         "/sub/index.html", "/sub/page.txt", "/a;b.txt", "/a:b@c.txt", "/" + ODD_NAME,
         "/tilde~.txt", "/space%20name.txt", "/caf%C3%A9.txt", "/UPPER.TXT", "/app.js",
         "/style.css", "/missing.txt", "/sub/missing"]
# the paths the kernel caches, weighted up: most cases should be the kernel's to answer
CACHED = ["/", "/index.html", "/empty.txt", "/one.txt", "/k1.bin", "/seg_under.bin",
          "/seg_over.bin", "/seg_edge.bin", "/seg_edge_close.bin", "/seg_edge6.bin", "/k64.bin",
          "/sub/",
          "/sub/page.txt", "/a;b.txt", "/a:b@c.txt", "/" + ODD_NAME, "/tilde~.txt",
          "/style.css"]


# --- the grammar ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    writes: tuple[bytes, ...]  # sent one after another (two: a request split in two segments)
    methods: tuple[str, ...]  # the method of each request, to frame the answers
    ipv6: bool = False  # every connection over ::1 (else every IPV6_EVERY-th)

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


QUERY_CHARS = "abcxyz0123456789=&;:@!$'()*+,~/?-._"
HOSTS = ["localhost", "LocalHost", "127.0.0.1", "127.0.0.1:{port}", "localhost:80", "[::1]",
         "[::1]:8080", "", "user@localhost", "user:pw@localhost", "localhost.", "example.com.",
         "a-b.c_d", "localhost:", "[::1", "a..b", "-x", "xn--bcher-kva.example",
         "localhost:99999999999", "[]", "[v1.x]", "1.2.3.4.5", "localhost:8o", "h\u00e9.example"]
CONNECTIONS = ["close", "keep-alive", "Close", "KEEP-ALIVE", "close, keep-alive",
               "keep-alive, Upgrade", "TE", "", "close,", "Keep-Alive"]
CONDITIONS = {
    "If-None-Match": ["{etag}", "W/{etag}", '"x", {etag}', "*", "garbage", "{etag}, {etag}", '""',
                      '"other"', "{etag},", ' {etag}'],
    "If-Modified-Since": [LM, OLDER, NEWER, "yesterday", "Sunday, 06-Nov-94 08:49:37 GMT",
                          "Sun Nov  6 08:49:37 1994"],
    "If-Unmodified-Since": [LM, OLDER],
    "If-Match": ["*", "{etag}", '"x"'],
    "Range": ["bytes=0-0", "bytes=0-4", "bytes=-1", "bytes=1-", "bytes=0-1,3-4", "pages=1-2",
              "bytes=100000-", "bytes=x"],
    "If-Range": ["{etag}", LM, OLDER],
}
PLAIN = {
    "Accept": ["*/*", "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"],
    "User-Agent": ["fuzz/1.0", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101"],
    "Accept-Encoding": ["gzip", "gzip, deflate, br", "identity", "*;q=0", "br;q=1.0, gzip;q=0.5",
                        ""],
    "Accept-Language": ["en-US,en;q=0.5"],
    "Cache-Control": ["no-cache", "max-age=0", "no-store, no-transform"],
    "Pragma": ["no-cache"],
    "Referer": ["http://localhost/", "http://x/?a=b;c=d"],
    "Cookie": ["a=b; c=d", "session=\"q\"; x=1"],
    "DNT": ["1"],
    "TE": ["trailers"],
    "Keep-Alive": ["timeout=5"],
    "Via": ["1.1 proxy"],
    "Forwarded": ["for=192.0.2.60;proto=http"],
    "X-Empty": [""],
    "X-Tchars!#$%&'*+.^_`|~": ["odd name"],
    "X-Obs": ["caf\u00e9", "\u00ff\u0080"],
    "Proxy-Connection": ["close", "keep-alive"],
}
RARE = {
    "Expect": ["100-continue", "something"],
    "Content-Length": ["0"],
    "Upgrade": ["websocket"],
    "Content-Range": ["bytes 0-1/2"],
    "X-Ctl": ["a\x7fb", "a\x01b"],
}


class Grammar:
    """Seeded request generator; `etags` maps a path to the ETag of the file it names."""

    def __init__(self, seed: int, port: int, etags: dict[str, str]) -> None:
        self.rng = random.Random(seed)
        self.port = port
        self.etags = etags

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, seq):
        return self.rng.choice(seq)

    def method(self, mild: bool) -> str:
        r = self.rng.random() * (0.88 if mild else 1.0)
        if r < 0.62:
            return "GET"
        if r < 0.88:
            return "HEAD"
        return self.pick(["get", "Get", "head", "POST", "OPTIONS", "DELETE", "FOO", "GETX"])

    def pct(self, ch: str) -> str:
        enc = "".join(f"%{b:02X}" for b in ch.encode())
        return enc.lower() if self.chance(0.3) else enc

    def target(self, path: str, mild: bool) -> str:
        t = path
        if mild:
            if self.chance(0.3):
                t += "?" + "".join(self.pick(QUERY_CHARS) for _ in range(self.rng.randrange(12)))
            return t
        if self.chance(0.1) and len(t) > 1:  # one character percent-encoded
            i = self.rng.randrange(1, len(t))
            t = t[:i] + self.pct(t[i]) + t[i + 1:]
        if self.chance(0.05):
            t = t.replace("/", "//", 1)
        if self.chance(0.05):
            t = self.pick(["/.", "/sub/..", "/./.", "/x/../"]).rstrip("/") + t
        if self.chance(0.05):
            t += "/"
        if self.chance(0.25):
            t += "?" + "".join(self.pick(QUERY_CHARS) for _ in range(self.rng.randrange(0, 12)))
            if self.chance(0.2):
                t += self.pick(["%41", "%zz", "%", "%2F"])
        if self.chance(0.02):
            t += "#frag"
        if self.chance(0.02):
            t = self.pick(["http://localhost", "HTTP://127.0.0.1:80"]) + t
        return t

    def name_case(self, name: str) -> str:
        r = self.rng.random()
        if r < 0.6:
            return name
        if r < 0.75:
            return name.lower()
        if r < 0.85:
            return name.upper()
        return "".join(c.upper() if self.chance(0.5) else c.lower() for c in name)

    def field(self, name: str, value: str, mild: bool) -> str:
        ows = ["", " ", " ", " ", "  ", "\t", " \t"]
        trail = ["", "", "", "", " ", "\t", " \t "]
        line = f"{self.name_case(name)}:{self.pick(ows)}{value}{self.pick(trail)}"
        if not mild and self.chance(0.02):
            line += self.pick(["\r\n folded", "\r\n\tfolded"])
        return line

    def request(self) -> tuple[str, str]:
        """(method, request bytes as text): one request of the grammar. Most are mild (GET or
        HEAD of a cached file, fields the kernel may take), so the kernel answers many."""
        mild = self.chance(0.6)
        method = self.method(mild)
        path = self.pick(CACHED) if mild or self.chance(0.6) else self.pick(PATHS)
        etag = self.etags.get(path, '"none"')
        versions = ["HTTP/1.0"] * 8 + ([] if mild else ["HTTP/1.2", "http/1.1"])
        version = "HTTP/1.1" if self.chance(0.75) else self.pick(versions)
        sp = " " if mild or self.chance(0.96) else "  "
        lines = [f"{method}{sp}{self.target(path, mild)} {version}"]
        fields: list[tuple[str, str]] = []
        if version != "HTTP/1.0" or self.chance(0.5):
            hosts = HOSTS[:7] + ["localhost.", "localhost:"] if mild else HOSTS
            fields.append(("Host", self.pick(hosts).format(port=self.port)
                           if self.chance(0.3) else "localhost"))
        for name in self.rng.sample(sorted(PLAIN), self.rng.randrange(0, 5)):
            fields.append((name, self.pick(PLAIN[name])))
        if self.chance(0.3):
            fields.append(("Connection", self.pick(CONNECTIONS[:4] if mild else CONNECTIONS)))
        for _ in range(self.pick([0, 0, 0, 0, 1, 1, 2])):
            name = "If-None-Match" if mild and self.chance(0.8) else \
                self.pick(["If-None-Match"] * 4 + sorted(CONDITIONS))
            value = etag if name == "If-None-Match" and self.chance(0.5) else \
                self.pick(CONDITIONS[name]).replace("{etag}", etag)
            fields.append((name, value))
        if not mild and self.chance(0.08):
            name = self.pick(sorted(RARE))
            fields.append((name, self.pick(RARE[name])))
        if self.chance(0.06):
            lengths = [200, 900, 1700] + ([] if mild else [1900, 3000])
            fields.append(("X-Long", "v" * self.pick(lengths)))
        if fields and self.chance(0.12):  # a duplicate, with the same or another value
            name, value = self.pick(fields)
            pool = {**PLAIN, **CONDITIONS, "Host": HOSTS, "Connection": CONNECTIONS}.get(name)
            if pool and self.chance(0.5):
                value = self.pick(pool).replace("{etag}", etag).replace("{port}", str(self.port))
            fields.append((name, value))
        self.rng.shuffle(fields)
        lines += [self.field(n, v, mild) for n, v in fields]
        eol = "\r\n" if mild or self.chance(0.9) else "\n"
        text = eol.join(lines) + eol + eol
        if not mild and self.chance(0.04):  # one bare LF among CRLFs
            text = text.replace("\r\n", "\n", 1)
        return method, text

    def case(self, index: int) -> Case:
        method, text = self.request()
        data = text.encode("latin-1", "replace") if not _is_utf8_case(text) else text.encode()
        shape = self.rng.random()
        if shape < 0.1:
            cut = self.rng.randrange(1, len(data))
            return Case(f"gen{index}-split", (data[:cut], data[cut:]), (method,))
        if shape < 0.2:
            method2, text2 = self.request()
            return Case(f"gen{index}-pipelined", (data + text2.encode("latin-1", "replace"),),
                        (method, method2))
        return Case(f"gen{index}", (data,), (method,))


def _is_utf8_case(text: str) -> bool:
    return "h\u00e9" in text  # a Host with a UTF-8 name: sent as UTF-8, the rest as Latin-1


# --- fixed cases: every difference this test found -------------------------------------------

def r(line: str, *fields: str, host: str | None = "localhost") -> bytes:
    lines = [line, *([f"Host: {host}"] if host is not None else []), *fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def fixed(name: str, data: bytes, *methods: str, ipv6: bool = False) -> Case:
    return Case(name, (data,), methods or (data.split(b" ", 1)[0].decode(),), ipv6)


# The kernel answers these itself: near the segment size, HTTP/1.0, close.
KERNEL_CASES: list[Case] = [
    fixed("plain-get", r("GET /k1.bin HTTP/1.1")),
    fixed("http10-head-close", r("HEAD /seg_edge_close.bin HTTP/1.0")),
    fixed("segment-edge-close", r("GET /seg_edge_close.bin HTTP/1.1", "Connection: close")),
    fixed("segment-edge-keep-alive", r("GET /seg_edge.bin HTTP/1.1")),
    fixed("inm-match-close", r("GET /one.txt HTTP/1.1", "If-None-Match: {etag}", "Connection: close")),
    fixed("ipv6-segment-edge", r("GET /seg_edge6.bin HTTP/1.1"), ipv6=True),
    fixed("ipv6-segment-edge-close", r("GET /seg_edge6.bin HTTP/1.0"), ipv6=True),
    # once a difference (user space let llhttp read Proxy-Connection as Connection), then handed
    # off; now both paths ignore the field, as nginx does
    fixed("proxy-connection-close", r("GET /one.txt HTTP/1.1", "Proxy-Connection: close")),
    fixed("http10-proxy-connection-keep-alive",
          r("GET /one.txt HTTP/1.0", "proxy-connection: Keep-Alive")),
]

# Differences found (kernel answer / user answer), each now handed off by the kernel.
REGRESSIONS: list[Case] = [
    # kernel 304, user 400: If-Modified-Since is a singleton field, repeated it is refused
    # (nginx too) even though a matching If-None-Match makes it irrelevant
    fixed("ims-repeated-with-inm-match",
          r("GET /one.txt HTTP/1.1", "If-None-Match: {etag}", f"If-Modified-Since: {LM}",
            f"If-Modified-Since: {LM}")),
    fixed("ims-repeated-invalid-with-inm-match",
          r("HEAD /one.txt HTTP/1.0", "If-Modified-Since: garbage", "If-None-Match: {etag}",
            "if-modified-since: garbage")),
    # over IPv6 the kernel's segments were as long as over IPv4, 20 bytes more than
    # bpf_skb_change_tail takes: one-segment answers of 15,979-15,998 bytes were dropped (the
    # client got nothing, then the answer's first 20 bytes), longer ones stalled after a part
    fixed("ipv6-one-segment-ipv4-edge", r("GET /seg_edge.bin HTTP/1.1"), ipv6=True),
    fixed("ipv6-one-segment-ipv4-edge-close", r("GET /seg_edge.bin HTTP/1.0"), ipv6=True),
    fixed("ipv6-two-segments", r("GET /seg_over.bin HTTP/1.1"), ipv6=True),
    fixed("ipv6-many-segments", r("GET /k64.bin HTTP/1.1"), ipv6=True),
]


# --- talking to a server ----------------------------------------------------------------------

class Transcript:
    """Everything one connection received, read as answers to the requests sent on it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.raw, self.pos, self.end = sock, b"", 0, ""

    def _recv(self) -> bytes:
        return self.sock.recv(1 << 16)

    def _fill(self) -> bool:
        try:
            chunk = self._recv()
        except ConnectionResetError:
            self.end = "reset"
            return False
        except socket.timeout:
            self.end = "timeout"
            return False
        if not chunk:
            self.end = "eof"
        self.raw += chunk
        return bool(chunk)

    def drain(self) -> None:
        while not self.end and self._fill():
            pass

    def probe(self) -> None:
        """The connection was left open: a last `Connection: close` request shows that in the
        transcript, and its answer ends it."""
        try:
            self.sock.sendall(PROBE)
        except OSError:
            pass
        self.drain()

    def answers(self, methods: tuple[str, ...]) -> bool:
        """Read one answer per method; False once the connection ended (or said it will)."""
        for method in methods:
            while True:
                while b"\r\n\r\n" not in self.raw[self.pos:]:
                    if not self._fill():
                        return False
                end = self.raw.index(b"\r\n\r\n", self.pos) + 4
                head = self.raw[self.pos:end].decode("latin-1").lower()
                self.pos = end
                status = int(head.split(" ", 2)[1])
                if "\r\nconnection: close\r\n" in head:
                    self.drain()  # an answer announcing the close: the rest is up to EOF
                    return False
                if status >= 200:
                    break  # 1xx: the final answer follows
            m = re.search(r"\r\ncontent-length: *(\d+)", head)
            length = int(m.group(1)) if m and method != "HEAD" and status not in (204, 304) else 0
            while len(self.raw) - self.pos < length:
                if not self._fill():
                    return False
            self.pos += length
        return True

    def normalised(self) -> bytes:
        data = re.sub(rb"\r\nDate: [^\r\n]*", b"\r\nDate: -", self.raw)
        for boundary in set(re.findall(rb"boundary=([0-9a-f]+)", data)):
            data = data.replace(boundary, b"BOUNDARY")
        # RST or FIN after the answers is a race between our probe and the server's close
        # (it resets when the probe is unread), so only "closed" is compared
        end = "closed" if self.end in ("eof", "reset") else self.end
        return data + b"\n<" + end.encode() + b">"


class Counters:
    """The kernel server's answered and hand-off counters, read from its pinned stats map."""

    def __init__(self, port: int) -> None:
        names = {k.removeprefix("FS_STAT_").lower(): v
                 for k, v in Abi(config.ABI_HEADER).enum("fs_stat").items()}
        self.keys = {n: i.to_bytes(4, "little") for n, i in names.items()
                     if n in ("responses", "syn_passed") or n.startswith("handoff_")}
        self.map = libbpf.Map.from_pin(config.pin_dir(port) / "stats")

    def read(self) -> Counter:
        return Counter({n: sum(int.from_bytes(v[:8], "little") for v in self.map[k])
                        for n, k in self.keys.items()})

    def close(self) -> None:
        self.map.close()


@dataclass
class Seen:
    transcript: bytes
    kernel: str = ""  # on the kernel server: "answered" or the hand-off reason(s)


_sources = iter(range(1 << 62))


def exchange(port: int, case: Case, warm: bool, counters: Counters | None = None) -> Seen:
    """Send `case` (after WARMUP on the same connection if `warm`), then PROBE if left open.

    Each connection comes from another loopback address: a server-side TIME_WAIT socket of an
    earlier connection with the same tuple would take the SYN from the kernel path."""
    start = counters.read() if counters else Counter()
    n = next(_sources)
    if case.ipv6 or n % IPV6_EVERY == 0:
        address, source = "::1", "::1"  # the only IPv6 loopback address
    else:
        address, source = "127.0.0.1", f"127.0.{n // 250 % 200 + 1}.{n % 250 + 2}"
    with socket.create_connection((address, port), timeout=READ_TIMEOUT,
                                  source_address=(source, 0)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = Transcript(sock)
        open_ = True
        if warm:
            sock.sendall(WARMUP)
            open_ = t.answers(("GET",))
        before = counters.read() if counters else Counter()
        if open_:
            for i, chunk in enumerate(case.writes):
                if i:
                    time.sleep(SPLIT_PAUSE)  # so the second write is a segment of its own
                sock.sendall(chunk)
            open_ = t.answers(case.methods)
        kernel = ""
        if counters:
            end = counters.read()
            moved = end - before
            if end["syn_passed"] > start["syn_passed"]:
                kernel = "syn_passed"  # the kernel's TCP stack had it from the start
            else:
                kernel = "answered" if moved["responses"] else ",".join(sorted(moved)) or "none"
        if open_:
            t.probe()
        return Seen(t.normalised(), kernel)


# --- servers ----------------------------------------------------------------------------------

@dataclass
class Pair:
    user: int
    kernel: int
    counters: Counters
    etags: dict[str, str]


def _etag_of(port: int, path: str) -> str | None:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(r(f"HEAD {path} HTTP/1.1", "Connection: close"))
        t = Transcript(sock)
        t.drain()
    m = re.search(rb"\r\nETag: ([^\r\n]+)", t.raw)
    return m.group(1).decode() if m else None


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    if os.geteuid() != 0:
        pytest.skip("the kernel path needs root")
    if not config.BPF_OBJECT.exists():
        pytest.skip(f"{config.BPF_OBJECT} is not built (make -C bpf)")
    root = tmp_path_factory.mktemp("diff") / "www"
    root.mkdir()
    build_docroot(root)
    servers = []
    try:
        ports = []
        for args in (["-n"], []):
            port = pick_port()
            env = {"FILESERVER_PORT": str(port), "FILESERVER_DOCROOT": str(root),
                   "FILESERVER_INTERFACE": "lo"}
            servers.append(start_fsctl([*args, "--workers", "1"], port, env=env))
            ports.append(port)
        counters = Counters(ports[1])
        etags = {p: e for p in PATHS if (e := _etag_of(ports[0], p)) is not None}
        try:
            yield Pair(ports[0], ports[1], counters, etags)
        finally:
            counters.close()
    finally:
        for server in servers:
            output = "".join(server.output)
            assert server.stop() == 0, output
            assert "Traceback" not in output, output


def diff_message(case: Case, warm: bool, user: Seen, kernel: Seen) -> str:
    return (f"{case.name} ({'second on keep-alive' if warm else 'fresh connection'}), "
            f"kernel path: {kernel.kernel}\nrequest: {case.data!r}\n"
            f"user:   {user.transcript[:1500]!r}\nkernel: {kernel.transcript[:1500]!r}")


def compare(pair: Pair, case: Case) -> tuple[list[str], list[str]]:
    """(differences, how the kernel server took each exchange) for both connection kinds."""
    etag = pair.etags["/one.txt"].encode()  # what {etag} in a fixed case stands for
    case = Case(case.name, tuple(w.replace(b"{etag}", etag) for w in case.writes), case.methods,
                case.ipv6)
    diffs, taken = [], []
    for warm in (False, True):
        user = exchange(pair.user, case, warm)
        kernel = exchange(pair.kernel, case, warm, pair.counters)
        taken.append(kernel.kernel)
        if user.transcript != kernel.transcript:
            diffs.append(diff_message(case, warm, user, kernel))
    return diffs, taken


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", REGRESSIONS, ids=[c.name for c in REGRESSIONS])
def test_regression_case_matches_user_space(pair: Pair, case: Case):
    diffs, _ = compare(pair, case)
    assert not diffs, "\n\n".join(diffs)


@pytest.mark.parametrize("case", KERNEL_CASES, ids=[c.name for c in KERNEL_CASES])
def test_kernel_answers_itself_what_user_space_answers(pair: Pair, case: Case):
    """These are the kernel's (so their match means something), byte for byte user space's."""
    diffs, taken = compare(pair, case)
    assert not diffs, "\n\n".join(diffs)
    assert taken == ["answered", "answered"], taken


def test_generated_requests_get_the_same_bytes_from_both_paths(pair: Pair):
    grammar = Grammar(SEED, pair.kernel, pair.etags)
    deadline = time.monotonic() + TIME_BUDGET
    diffs: list[str] = []
    taken: Counter = Counter()
    ran = 0
    for index in range(CASES):
        if time.monotonic() > deadline:
            break
        case = grammar.case(index)
        found, how = compare(pair, case)
        diffs += found
        taken.update(how)
        ran += 1
    answered = taken["answered"]
    print(f"\n{ran} cases, {2 * ran} exchanges per server; kernel answered {answered} "
          f"({answered / max(1, 2 * ran):.0%}); handed off: "
          f"{dict(taken.most_common())}")
    assert not diffs, f"{len(diffs)} differences:\n\n" + "\n\n".join(diffs[:10])
    assert ran >= min(CASES, 100), f"only {ran} cases within {TIME_BUDGET} s"
    assert answered >= MIN_KERNEL_SHARE * 2 * ran, dict(taken)
