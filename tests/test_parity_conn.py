"""Connection handling and limits against nginx, on both answer paths.

Same machinery as test_nginx_parity.py (its docroot, servers, `observe` and comparison): each
case is sent raw to nginx and to this server with (`fsctl up`) and without (`fsctl up -n`) the
kernel fast path. Case ids start with "conn-" so that they never meet the other modules' cached
observations.
"""

from __future__ import annotations

import socket

import pytest

from test_nginx_parity import G, H, build_docroot, docroot, nginx, ours, r  # noqa: F401


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


def whole_exchange(port: int, data: bytes) -> bytes:
    """Everything the server sends until it closes (bounded by a 5 s silence)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
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
    ("field-long", r(H.format("/small.txt"), "X-A: " + "v" * 20000), 431),
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

    ref_status, _, ref_body = last_answer(whole_exchange(nginx, data))
    assert ref_body == b"", "nginx changed"
    assert ref_status == (400 if status == 431 else status), "nginx changed"
    got_status, head, body = last_answer(whole_exchange(ours[1], data))
    assert got_status == status
    assert b"\r\nConnection: close" in head
    assert body == b""
