"""Connection handling and limits against nginx, on both answer paths.

Same machinery as test_nginx_parity.py (its docroot, servers, `observe` and comparison): each
case is sent raw to nginx and to this server with (`fsctl up`) and without (`fsctl up -n`) the
kernel fast path. Case ids start with "conn-" so that they never meet the other modules' cached
observations. nginx's limits (large_client_header_buffers 4 8k, max_headers 1000):
  - a request line longer than 8192 bytes with its CRLF is 414, however long its target;
  - more than 1000 header fields (Host included) are refused, nginx says 400;
  - a header block fits in about 32 KiB (four 8 KiB buffers); one field line in 8 KiB (this
    server takes up to 16 KiB, see test_nginx_parity's long-header-10k);
  - a Content-Length over 1 MiB (client_max_body_size 1m) is 413, before method and target.
An error answer to a HEAD has no body, also when the HEAD is refused while being parsed.
Where nginx says 400 for a head too large, this server says 431 (RFC 6585 §5), as
test_nginx_parity's too-many-headers does.
"""

from __future__ import annotations

import socket

import pytest

from test_nginx_parity import (LM, G, H, Case, assert_like_nginx, build_docroot,  # noqa: F401
                               docroot, nginx, ours, r)

WHY_431 = "RFC 6585 §5: 431 names the cause; nginx says 400"


def line_of(method: str, length: int, query: str = "") -> str:
    """A request line of `length` bytes (without CRLF) for /small.txt (with `query`) or a miss."""
    base = f"{method}  HTTP/1.1"
    if query:
        target = "/small.txt?" + query
        return f"{method} {target}{'q' * (length - len(base) - len(target))} HTTP/1.1"
    return f"{method} /{'a' * (length - len(base) - 1)} HTTP/1.1"


def fields(count: int, size: int = 8) -> list[str]:
    """count header field lines of `size` bytes each (without CRLF), distinct names."""
    out = []
    for i in range(count):
        name = f"X-{i}: "
        out.append(name + "v" * max(1, size - len(name)))
    return out


CASES = [
    # the request line: 8190 bytes and CRLF fill nginx's 8 KiB buffer; one more byte is 414
    Case("conn-line-8190-miss", r(line_of("GET", 8190)), (404,)),
    Case("conn-line-8191-miss", r(line_of("GET", 8191)), (414,)),
    Case("conn-line-8190-hit", r(line_of("GET", 8190, "x=")), (200,)),
    Case("conn-line-8191-hit", r(line_of("GET", 8191, "x=")), (414,)),
    Case("conn-line-8191-head", r(line_of("HEAD", 8191, "x=")), (414,)),
    Case("conn-line-8191-pipelined", r(G.format("/small.txt")) + r(line_of("GET", 8191)),
         (200, 414), heads=(False, False)),
    # header fields: 1000 in all (Host is one of them) are taken, 1001 are not
    Case("conn-fields-1000", r(G.format("/small.txt"), *fields(999)), (200,)),
    Case("conn-fields-1001", r(G.format("/small.txt"), *fields(1000)), (400,), ours=(431,),
         why=WHY_431),
    Case("conn-fields-1001-short", r(G.format("/small.txt"), *(["A:"] * 1000)), (400,),
         ours=(431,), why=WHY_431),
    Case("conn-fields-1000-pipelined", r(G.format("/small.txt"), *fields(999))
         + r(H.format("/f1k.bin")), (200, 200), heads=(False, True)),
    # a head between 16 and 32 KiB in lines nginx takes: served
    Case("conn-head-20k", r(G.format("/small.txt"), *fields(200, 100)), (200,)),
    Case("conn-head-31k", r(G.format("/small.txt"), *fields(30, 1000)), (200,)),
    Case("conn-head-31k-pipelined", r(G.format("/small.txt"), *fields(300, 100))
         + r(G.format("/f1k.bin")), (200, 200), heads=(False, False)),
    Case("conn-head-40k", r(G.format("/small.txt"), *fields(400, 100)), (400,), ours=(431,),
         why=WHY_431),
    # a body of nginx's client_max_body_size (1 MiB) is read and dropped, the connection goes on
    Case("conn-body-1m", r(G.format("/small.txt"), f"Content-Length: {1 << 20}",
                           body=b"x" * (1 << 20)) + r(H.format("/f1k.bin")),
         (200, 200), heads=(False, True)),
]

# Matched nginx before these limits were set; kept as a guard: 100 requests in one write,
# hits, misses, HEADs, a sendfile answer, ranges, redirects, 304s and bodies, answered in order
MIX = [(r(G.format("/small.txt")), False, 200), (r(G.format("/nope")), False, 404),
       (r(H.format("/f1k.bin")), True, 200), (r(G.format("/big.bin")), False, 200),
       (r(G.format("/f1k.bin"), "Range: bytes=1-2"), False, 206), (r(G.format("/sub")), False, 301),
       (r(H.format("/nope")), True, 404),
       (r(G.format("/small.txt"), f"If-Modified-Since: {LM}"), False, 304),
       (r(G.format("/small.txt"), "Content-Length: 3", body=b"abc"), False, 200),
       (r(H.format("/small.txt"), "Transfer-Encoding: chunked", body=b"3\r\nabc\r\n0\r\n\r\n"),
        True, 200)]
CASES.append(Case("conn-pipelined-100", b"".join(m[0] for m in MIX) * 10,
                  tuple(m[2] for m in MIX) * 10, heads=tuple(m[1] for m in MIX) * 10))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_nginx_conn(case: Case, nginx: int, ours: tuple[str, int]):  # noqa: F811
    assert_like_nginx(case, nginx, ours, persistence=True)


_exchanged: dict[tuple[int, bytes, bool], bytes] = {}  # nginx's, reused by both of our paths


def nginx_exchange(port: int, data: bytes, shut: bool = False, timeout: float = 5) -> bytes:
    """whole_exchange with nginx, once per request."""
    if (port, data, shut) not in _exchanged:
        _exchanged[port, data, shut] = whole_exchange(port, data, shut, timeout)
    return _exchanged[port, data, shut]


def whole_exchange(port: int, data: bytes, shut: bool = False, timeout: float = 5) -> bytes:
    """Everything the server sends until it closes (bounded by `timeout` s of silence); shut:
    the client half-closes after its request."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return out


# RFC 9110 §9.3.2: no content in an answer to HEAD, error answers included; nginx sends the
# head of its error page alone. (The status may differ where this server says 431.)
HEAD_ERRORS = [
    ("bad-host", r(H.format("/small.txt"), host="a/b"), 400),
    ("two-hosts", r(H.format("/small.txt"), "Host: other"), 400),
    ("no-host", r(H.format("/small.txt"), host=None), 400),
    ("bad-escape", r(H.format("/small%zz.txt")), 400),
    ("bad-content-length", r(H.format("/small.txt"), "Content-Length: abc"), 400),
    ("two-content-lengths", r(H.format("/small.txt"), "Content-Length: 1", "Content-Length: 2"),
     400),
    ("obs-fold", r(H.format("/small.txt"), "X-A: b", " folded"), 400),
    ("nul", r(H.format("/small.txt"), "X-A: a\x00b"), 400),
    ("space-before-colon", r(H.format("/small.txt"), "X-A : b"), 400),
    ("userinfo", r(H.format("http://u@localhost/small.txt")), 400),
    ("two-ims", r(H.format("/small.txt"), "If-Modified-Since: a", "If-Modified-Since: b"), 400),
    ("te-gzip", r(H.format("/small.txt"), "Transfer-Encoding: gzip"), 501),
    ("te-http10", r("HEAD /small.txt HTTP/1.0", "Transfer-Encoding: chunked"), 400),
    ("te-twice", r(H.format("/small.txt"), "Transfer-Encoding: chunked",
                   "Transfer-Encoding: chunked"), 400),
    ("uri-long", r(H.format("/" + "a" * 9000)), 414),
    ("line-8191", r(line_of("HEAD", 8191, "x=")), 414),
    ("field-long", r(H.format("/small.txt"), "X-A: " + "v" * 20000), 431),
    ("fields-1001", r(H.format("/small.txt"), *fields(1000)), 431),
    ("head-40k", r(H.format("/small.txt"), *fields(400, 100)), 431),
    ("after-good", r(G.format("/small.txt")) + r(H.format("/small.txt"), host="a/b"), 400),
]


@pytest.mark.parametrize(("data", "status"), [c[1:] for c in HEAD_ERRORS],
                         ids=[c[0] for c in HEAD_ERRORS])
def test_error_answer_to_head_has_no_body(nginx: int, ours: tuple[str, int],  # noqa: F811
                                          data: bytes, status: int):
    def last_answer(raw: bytes) -> tuple[int, bytes, bytes]:
        start = raw.rfind(b"HTTP/1.1 ")
        head, _, body = raw[start:].partition(b"\r\n\r\n")
        return int(head[9:12]), head, body

    ref_status, _, ref_body = last_answer(nginx_exchange(nginx, data))
    assert ref_body == b"", "nginx changed"
    assert ref_status == (400 if status == 431 else status), "nginx changed"
    got_status, head, body = last_answer(whole_exchange(ours[1], data))
    assert got_status == status
    assert b"\r\nConnection: close" in head
    assert body == b""


# RFC 9110 §15.5.14: a Content-Length over nginx's client_max_body_size (1 MiB) is 413 and the
# connection closes, whatever the method or target (nginx checks it before both)
OVER = f"Content-Length: {(1 << 20) + 1}"
TOO_LARGE = [
    ("get", r(G.format("/small.txt"), OVER)),
    ("head", r(H.format("/small.txt"), OVER)),
    ("miss", r(G.format("/missing"), OVER)),
    ("post", r("POST /small.txt HTTP/1.1", OVER)),
    ("unknown-method", r("FOO /small.txt HTTP/1.1", OVER)),
    ("http10", r("GET /small.txt HTTP/1.0", OVER)),
    ("after-good", r(G.format("/small.txt")) + r(G.format("/small.txt"), OVER)),
]


@pytest.mark.parametrize("data", [c[1] for c in TOO_LARGE], ids=[c[0] for c in TOO_LARGE])
def test_content_length_over_limit_is_413(nginx: int, ours: tuple[str, int],  # noqa: F811
                                          data: bytes):
    def answers(raw: bytes) -> list[tuple[int, bytes, bytes]]:
        out = []
        for part in raw.split(b"HTTP/1.1 ")[1:]:
            head, _, body = part.partition(b"\r\n\r\n")
            out.append((int(head[:3]), head, body))
        return out

    head_only = data.startswith(b"HEAD ")
    # nginx lingers (waiting for the body) after its answer: 2 s of silence end the wait
    reference = answers(nginx_exchange(nginx, data, shut=True, timeout=2))
    got = answers(whole_exchange(ours[1], data, shut=True))
    assert [a[0] for a in reference][-1] == 413, "nginx changed"
    assert [a[0] for a in got] == [a[0] for a in reference]
    status, head, body = got[-1]
    assert b"\r\nConnection: close" in head
    assert (body == b"") == head_only
