"""The status line and header block of a file response, shared by the kernel and user-space paths.

Both paths send bytes built here, so a kernel-cached answer and the aiohttp fallback can never
drift apart. Everything is pure: the only inputs are the status, an ``os.stat_result``, the file
name and the current ``Date`` value. Header order follows nginx: Server, Date, Content-Type,
Content-Length, Last-Modified, ETag, Accept-Ranges, then any extras, and ``Connection: close``
always last so the kernel can append it right before the final CRLF.
"""

from __future__ import annotations

import mimetypes
import os
from email.utils import formatdate
from functools import lru_cache
from http import HTTPStatus
from pathlib import PurePath

from .http_semantics import parse_http_date

SERVER = "ebpf-fileserver"
DATE_LEN = 29  # len("Sun, 06 Nov 1994 08:49:37 GMT"): IMF-fixdate is fixed width
CRLF = "\r\n"
CONNECTION_CLOSE = "Connection: close\r\n"

Headers = list[tuple[str, str]]

# A file named x.gz/x.br served as itself (not as a negotiated encoding of x) is an archive.
_ENCODING_TYPES = {
    "gzip": "application/gzip",
    "br": "application/x-brotli",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "compress": "application/x-compress",
}
# Where the system's table (mimetypes reads /etc/mime.types) names another type than nginx's
# mime.types, or none, nginx's, so that a client sees what nginx would send: .ts is an MPEG
# transport stream (HLS), not a Qt Linguist file; .mid is audio/midi, not SP-MIDI; .3gp is
# video; RSS has no x- prefix; Java archives; .msm is a Windows installer module, not a GDL
# model; executables and disk images are plain octets. Kept otherwise, for an RFC's reason
# (tests/test_parity_paths.py KEPT_TYPES): .js/.mjs text/javascript (RFC 9239), .xml
# application/xml (RFC 7303), .gz/.svgz application/gzip (RFC 6713: the bytes are gzip).
# Registered in mimetypes' table below, over the system's.
_TYPE_OVERRIDES = {
    ".ts": "video/mp2t",
    ".mid": "audio/midi",
    ".midi": "audio/midi",
    ".kar": "audio/midi",
    ".3gp": "video/3gpp",
    ".3gpp": "video/3gpp",
    ".rss": "application/rss+xml",
    ".war": "application/java-archive",
    ".ear": "application/java-archive",
    ".asx": "video/x-ms-asf",
    ".der": "application/x-x509-ca-cert",
    ".pem": "application/x-x509-ca-cert",
    ".asf": "video/x-ms-asf",
    ".bmp": "image/x-ms-bmp",
    ".ico": "image/x-icon",
    ".m4a": "audio/x-m4a",
    ".m4v": "video/x-m4v",
    ".mml": "text/mathml",
    ".ra": "audio/x-realaudio",
    ".rar": "application/x-rar-compressed",
    ".swf": "application/x-shockwave-flash",
    ".pl": "application/x-perl",
    ".pm": "application/x-perl",
    ".tcl": "application/x-tcl",
    ".tk": "application/x-tcl",
    ".pdb": "application/x-pilot",
    ".prc": "application/x-pilot",
    ".cco": "application/x-cocoa",
    ".jardiff": "application/x-java-archive-diff",
    ".run": "application/x-makeself",
    ".sea": "application/x-sea",
    **dict.fromkeys((".exe", ".dll", ".deb", ".dmg", ".iso", ".msi", ".msm"),
                    "application/octet-stream"),
}
for _ext, _type in _TYPE_OVERRIDES.items():
    mimetypes.add_type(_type, _ext)
_TEXTUAL_APPLICATION = {"application/javascript", "application/x-javascript",
                        "application/ecmascript", "application/json", "application/xml"}


def http_date(ts: float) -> str:
    """IMF-fixdate (RFC 9110 §5.6.7) of a Unix time; always DATE_LEN characters."""
    return formatdate(ts, usegmt=True)


def mtime_seconds(st: os.stat_result) -> int:
    """The whole second the file was last modified in, as Last-Modified states it and
    If-Modified-Since / If-Range compare it (rounded down, also before 1970)."""
    return st.st_mtime_ns // 1_000_000_000


@lru_cache(maxsize=4)
def _date_seconds(date: str) -> int | None:
    return parse_http_date(date)


def modified_in_future(st: os.stat_result, date: str) -> bool:
    """Whether the file's mtime is later than `date`, the Date of the answer."""
    now = _date_seconds(date)
    return now is not None and mtime_seconds(st) > now


def last_modified(st: os.stat_result, date: str) -> str:
    """The Last-Modified of a file in an answer dated `date`: the Date itself when the file's
    mtime is later (RFC 9110 §8.8.2.1 MUST; a clock set wrong, an archive from elsewhere)."""
    return date if modified_in_future(st, date) else http_date(mtime_seconds(st))


def etag(st: os.stat_result) -> str:
    """Strong validator from (inode, size, mtime_ns): changes whenever the file is replaced or written."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {_reason(status)}\r\n"


@lru_cache(maxsize=64)
def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


@lru_cache(maxsize=1024)
def _content_type_of_name(name: str) -> str:
    mime, encoding = mimetypes.guess_type(name, strict=False)
    if encoding is not None:
        mime = _ENCODING_TYPES.get(encoding, "application/octet-stream")
    if mime is None:
        return "application/octet-stream"
    if (mime.startswith("text/") or mime in _TEXTUAL_APPLICATION
            or mime.endswith("+xml") or mime.endswith("+json")):
        return f"{mime}; charset=utf-8"
    return mime


def content_type(path: PurePath | str) -> str:
    """Content-Type from the file name's extension; charset=utf-8 for textual types."""
    return _content_type_of_name(PurePath(path).name.lower())


def head_bytes(status: int, headers: Headers) -> bytes:
    """Status line, the headers in the given order, and the blank line that ends the head."""
    parts = [status_line(status)]
    parts.extend(f"{name}: {value}\r\n" for name, value in headers)
    parts.append(CRLF)
    return "".join(parts).encode("latin-1")


def file_headers(status: int, st: os.stat_result, path: PurePath | str, date: str, *,
                 close: bool = False, content_encoding: str | None = None,
                 vary: bool = False) -> Headers:
    """The header list of a 200 or 304 file response, in wire order.

    `path` names the resource (for its Content-Type): for a precompressed variant pass the
    original name and `content_encoding`, and `st` of the variant that is sent. `vary` adds
    `Vary: Accept-Encoding` (a precompressed sibling exists, so the answer depends on it).
    A 304 keeps the validators, Date and Server (RFC 9110 §15.4.5) but no Content-Length.
    """
    headers: Headers = [("Server", SERVER), ("Date", date)]
    if status == 304:
        headers.append(("Last-Modified", last_modified(st, date)))
        headers.append(("ETag", etag(st)))
    else:
        headers.append(("Content-Type", content_type(path)))
        headers.append(("Content-Length", str(st.st_size)))
        headers.append(("Last-Modified", last_modified(st, date)))
        headers.append(("ETag", etag(st)))
        headers.append(("Accept-Ranges", "bytes"))
        if content_encoding:
            headers.append(("Content-Encoding", content_encoding))
    if vary:
        headers.append(("Vary", "Accept-Encoding"))
    if close:
        headers.append(("Connection", "close"))
    return headers


def file_head(status: int, st: os.stat_result, path: PurePath | str, date: str, *,
              head_only: bool = False, close: bool = False,
              content_encoding: str | None = None, vary: bool = False) -> bytes:
    """Head of a 200 or 304 answer for a regular file (see file_headers).

    `head_only` (a HEAD request) changes nothing in the head: RFC 9110 §9.3.2 wants the same
    header fields as GET, Content-Length included; only the body is left out by the caller.
    """
    del head_only
    return head_bytes(status, file_headers(status, st, path, date, close=close,
                                           content_encoding=content_encoding, vary=vary))


def error_body(status: int) -> bytes:
    """A small HTML page for a status without a file body (nginx-like)."""
    title = f"{status} {_reason(status)}"
    return (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
            f"<center><h1>{title}</h1></center>\r\n<hr><center>{SERVER}</center>\r\n"
            "</body>\r\n</html>\r\n").encode("ascii")


def simple_head(status: int, date: str, length: int, *,
                content_type: str | None = "text/html; charset=utf-8",
                extra: Headers = (), close: bool = False) -> bytes:
    """Head of a generated answer (error page, redirect, listing, partial content)."""
    headers: Headers = [("Server", SERVER), ("Date", date)]
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    headers.append(("Content-Length", str(length)))
    headers.extend(extra)
    if close:
        headers.append(("Connection", "close"))
    return head_bytes(status, headers)


def partial_head(st: os.stat_result, path: PurePath | str, date: str, length: int, *,
                 content_range: str | None = None, boundary: str | None = None,
                 close: bool = False, content_encoding: str | None = None,
                 vary: bool = False) -> bytes:
    """Head of a 206: one part (`content_range` "bytes a-b/len") or multipart/byteranges."""
    ctype = (f"multipart/byteranges; boundary={boundary}" if boundary is not None
             else content_type(path))
    headers: Headers = [("Server", SERVER), ("Date", date), ("Content-Type", ctype),
                        ("Content-Length", str(length)),
                        ("Last-Modified", last_modified(st, date)), ("ETag", etag(st))]
    if content_range is not None:
        headers.append(("Content-Range", content_range))
    if content_encoding:
        headers.append(("Content-Encoding", content_encoding))
    if vary:
        headers.append(("Vary", "Accept-Encoding"))
    if close:
        headers.append(("Connection", "close"))
    return head_bytes(206, headers)
