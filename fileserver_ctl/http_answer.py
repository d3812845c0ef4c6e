"""What to send for one parsed request: synchronous, no socket in sight.

`answer(msg, files, date, on_served)` returns an Answer tuple: the bytes to write now (head,
plus the body when the file is in memory), an optional sendfile job for a body read from disk,
whether to close afterwards, and the status and body size for the log. The RFC rules come from
http_semantics.py, the header bytes from response.py, the files from http_files.py.
"""

from __future__ import annotations

import errno
import os
import secrets
import sys
import traceback
from typing import Callable, NamedTuple

from aiohttp import hdrs
from aiohttp.http_writer import HttpVersion10, HttpVersion11

from . import http_status, response
from .http_files import FileEntry, FileStore, Forbidden, Listing, Redirect
from .http_semantics import (choose_coding, has_close_option, has_connection_option,
                             if_range_allows, parse_range, precondition_status, target_path)

OnServed = Callable[[str, os.stat_result], None]
ALLOW = [("Allow", "GET, HEAD")]
PROXY_CONNECTION = "Proxy-Connection"
# Methods with a meaning elsewhere get 405; any other well-formed one gets 501.
KNOWN_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
                           "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK",
                           "SEARCH", "REPORT", "PURGE", "LINK", "UNLINK"})
_CONDITIONALS = (hdrs.IF_NONE_MATCH, hdrs.IF_MODIFIED_SINCE, hdrs.IF_MATCH,
                 hdrs.IF_UNMODIFIED_SINCE, hdrs.RANGE)


class Answer(NamedTuple):
    data: bytes  # to write now
    job: list | None  # [fd, piece, ...] sent after `data`: bytes, or (offset, count) of fd
    close: bool  # close the connection once everything is out
    status: int
    body_bytes: int  # what the access log calls $body_bytes_sent


_new_answer = tuple.__new__  # Answer(...) runs Python code; this builds the same tuple in C


def answer(msg, files: FileStore, date: str, on_served: OnServed | None) -> Answer:
    version = msg.version
    # llhttp takes a Proxy-Connection field for Connection; nginx ignores it, and so does this
    # server: the rare request carrying one has its persistence read from Connection alone.
    if version is HttpVersion11:
        close = msg.should_close
        if close and PROXY_CONNECTION in msg.headers:
            close = has_close_option(msg.headers.getall(hdrs.CONNECTION, ()))
        close = close or msg.upgrade  # after an Upgrade no request follows
    elif version == HttpVersion10:
        connection = msg.headers.getall(hdrs.CONNECTION, ())
        close = msg.should_close
        if not close and PROXY_CONNECTION in msg.headers:
            close = not has_connection_option(connection, "keep-alive")
        close = close or has_close_option(connection)
    else:  # HTTP/2.0 and later: 505; HTTP/0.x: 400, as nginx answers
        return simple(msg, 505 if version[0] >= 2 else 400, date, close=True)
    method = msg.method
    head_only = method == "HEAD"
    if not head_only and method != "GET":
        # TRACE also ends the connection, as nginx refuses it before reading the request on
        return simple(msg, 405 if method in KNOWN_METHODS else 501, date,
                      close=close or method == "TRACE", extra=ALLOW)
    target = msg.path
    path = (target if target[0] == "/" and "?" not in target and "#" not in target
            else target_path(target))
    found = files.lookup(path, target)
    if type(found) is FileEntry:
        headers = msg.headers
        if (found.body is not None and not found.variants and found.announced
                and hdrs.IF_NONE_MATCH not in headers and hdrs.RANGE not in headers
                and hdrs.IF_MODIFIED_SINCE not in headers and hdrs.IF_MATCH not in headers
                and hdrs.IF_UNMODIFIED_SINCE not in headers):
            # the hot path: a plain GET/HEAD of a small file already in memory
            return _new_answer(Answer, (found.answer_200(date, close, head_only), None, close,
                                        200, 0 if head_only else found.st.st_size))
        return _file(msg, found, files, date, head_only, close, on_served)
    if type(found) is Redirect:
        return simple(msg, 301, date, close=close, extra=[("Location", found.location)])
    if type(found) is Forbidden:
        return simple(msg, 403, date, close=close)
    if type(found) is Listing:
        page = files.listing_html(found)
        if page is not None:
            head = response.simple_head(200, date, len(page), close=close)
            return Answer(head if head_only else head + page, None, close, 200,
                          0 if head_only else len(page))
    if path == http_status.PATH:  # the server's figures, unless a file has that name
        data, status, body_bytes = http_status.answer(head_only, date, close)
        return Answer(data, None, close, status, body_bytes)
    return simple(msg, 404, date, close=close)


def simple(msg, status: int, date: str, *, close: bool, extra=(),
           head_only: bool = False) -> Answer:
    """A generated page: error, redirect (HEAD gets the head alone, RFC 9110 §9.3.2; head_only
    says so where there is no parsed message, for a request refused while being parsed)."""
    body = response.error_body(status)
    head = response.simple_head(status, date, len(body), extra=extra, close=close)
    if head_only or (msg is not None and msg.method == "HEAD"):
        return Answer(head, None, close, status, 0)
    return Answer(head + body, None, close, status, len(body))


def _file(msg, entry: FileEntry, files: FileStore, date: str, head_only: bool, close: bool,
          on_served: OnServed | None) -> Answer:
    headers = msg.headers
    if entry.variants:
        coding = choose_coding(_joined(headers, hdrs.ACCEPT_ENCODING), tuple(entry.variants))
        if coding is not None:
            entry = files.variant(entry, coding) or entry
    fd = -1
    if entry.body is None and not head_only:
        fd, entry = _open_current(entry)
        if fd < 0:
            return simple(msg, 403 if fd == -errno.EACCES else 404, date, close=close)
    for name in _CONDITIONALS:
        if name in headers:
            break
    else:  # no conditional, no range
        return _whole(entry, date, head_only, close, fd, on_served)
    status = precondition_status(_Joined(headers), entry.etag, entry.last_modified,
                                 is_get_or_head=True)
    if status == 412 or status == 304:
        _close_fd(fd)
        if status == 412:
            return simple(msg, 412, date, close=close)
        return Answer(entry.head(304, date, close), None, close, 304, 0)
    rng = headers.get(hdrs.RANGE)
    if rng is not None and not head_only:  # RFC 9110 §14.2: Range is for GET only
        if_range = headers.get(hdrs.IF_RANGE)
        if if_range is None or if_range_allows(if_range, entry.etag, entry.last_modified):
            ranges = parse_range(rng, entry.st.st_size)
            if ranges is not None:
                return _partial(msg, entry, ranges, date, close, fd)
    return _whole(entry, date, head_only, close, fd, on_served)


def _whole(entry: FileEntry, date: str, head_only: bool, close: bool, fd: int,
           on_served: OnServed | None) -> Answer:
    # once per file version and worker, not on every hit; not while its Last-Modified follows
    # the Date: the kernel's heads hold a fixed one
    if (not entry.announced and entry.coding is None
            and not response.modified_in_future(entry.st, date)):
        entry.announced = True
        if on_served is not None:
            try:
                on_served(entry.rel_path, entry.st)
            except Exception:  # the cache filler's trouble must not cost the client its answer
                traceback.print_exc(file=sys.stderr)
    size = entry.st.st_size
    if entry.body is not None or head_only:
        return Answer(entry.answer_200(date, close, head_only), None, close, 200,
                      0 if head_only else size)
    return Answer(entry.head(200, date, close), [fd, (0, size)], close, 200, size)


def _partial(msg, entry: FileEntry, ranges: list[tuple[int, int]], date: str, close: bool,
             fd: int) -> Answer:
    size = entry.st.st_size
    if not ranges:
        _close_fd(fd)
        return simple(msg, 416, date, close=close, extra=[("Content-Range", f"bytes */{size}")])
    body = entry.body
    if len(ranges) == 1:
        first, last = ranges[0]
        length = last - first + 1
        head = response.partial_head(entry.st, entry.name, date, length,
                                     content_range=f"bytes {first}-{last}/{size}",
                                     close=close, content_encoding=entry.coding,
                                     vary=entry.vary)
        if body is not None:
            return Answer(head + body[first:last + 1], None, close, 206, length)
        return Answer(head, [fd, (first, length)], close, 206, length)
    boundary = secrets.token_hex(10)
    ctype = response.content_type(entry.name)
    pieces: list = []
    length = 0
    for first, last in ranges:
        part = (f"\r\n--{boundary}\r\nContent-Type: {ctype}\r\n"
                f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n").encode("latin-1")
        pieces.append(part)
        pieces.append((first, last - first + 1))
        length += len(part) + last - first + 1
    end = f"\r\n--{boundary}--\r\n".encode("latin-1")
    pieces.append(end)
    length += len(end)
    head = response.partial_head(entry.st, entry.name, date, length, boundary=boundary,
                                 close=close, content_encoding=entry.coding, vary=entry.vary)
    if body is not None:
        data = b"".join(p if type(p) is bytes else body[p[0]:p[0] + p[1]] for p in pieces)
        return Answer(head + data, None, close, 206, length)
    return Answer(head, [fd, *pieces], close, 206, length)


def _close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _open_current(entry: FileEntry) -> tuple[int, FileEntry]:
    """Open a file to be sent from disk; the validators follow what was actually opened.
    On failure the fd is minus the errno."""
    try:
        fd = os.open(entry.fs_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        return -(exc.errno or errno.ENOENT), entry
    st = os.fstat(fd)
    if not entry.matches(st):
        entry = FileEntry(fs_path=entry.fs_path, rel_path=entry.rel_path, name=entry.name, st=st,
                          etag=response.etag(st), last_modified=response.mtime_seconds(st), body=None,
                          coding=entry.coding, variants=entry.variants,
                          checked_tick=entry.checked_tick)
    return fd, entry


def _joined(headers, name: str) -> str | None:
    """All field lines of one name as one list value (RFC 9110 §5.3)."""
    values = headers.getall(name, ())
    if not values:
        return None
    return values[0] if len(values) == 1 else ", ".join(values)


class _Joined:
    """headers.get() that combines repeated list-valued fields, for the precondition rules."""
    __slots__ = ("headers",)

    def __init__(self, headers) -> None:
        self.headers = headers

    def get(self, name: str) -> str | None:
        return _joined(self.headers, name)
