"""HTTP behaviour of the file server, checked with raw sockets and exact bytes.

The pure header builder (response.py) is tested directly; everything else runs against a live
server through the `server` fixture, parametrised over both paths (ids "user" and "kernel") so
the kernel fast path must pass the very same assertions as the user-space server.
"""

from __future__ import annotations

import os
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
