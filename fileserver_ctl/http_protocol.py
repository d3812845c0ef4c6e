"""One HTTP/1.1 connection: aiohttp's C request parser in, exact response bytes out.

aiohttp's web layer costs several times more per request than the parser itself, and its own
error pages and header order differ from what the kernel path sends, so a connection is a plain
asyncio Protocol that feeds aiohttp's llhttp-based parser and writes bytes built by response.py.
Pipelined requests are answered strictly in order: every parsed request goes through one queue;
small files are answered synchronously from memory, large ones with sendfile in a task that
holds the queue until the file is out.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import sys
import time
import traceback
from collections import deque
from typing import Callable

from aiohttp import hdrs
from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser
from aiohttp.http_writer import HttpVersion10, HttpVersion11
from aiohttp.streams import EMPTY_PAYLOAD

from . import response
from .http_files import FileEntry, FileStore, Listing, Redirect
from .access_log import AccessLog
from .http_stats import Tally
from .userstats import SlotRecorder
from .http_semantics import (choose_coding, if_range_allows, parse_range, precondition_status,
                             target_path)

URI_LIMIT = 8192  # request line longer than this: 414
FIELD_LIMIT = 16384  # one header line longer than this: 431
HEAD_LIMIT = 16384  # a whole header block longer than this: 431
MAX_HEADERS = 100  # more header lines than this: 431
MAX_QUEUED = 64  # parsed requests waiting for their turn before reading pauses
LINGER = 2.0  # seconds to drain input after an error answer, so the client sees it before RST
MEMO_REQUEST = 2048  # longest request whose parse result is remembered...
MEMO_ENTRIES = 1024  # ...and how many are (cleared when full)
SEND_TIMEOUT = 60.0  # seconds without any progress while sending before the peer is dropped

ALLOW = [("Allow", "GET, HEAD")]
KNOWN_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
                           "PROPFIND", "PROPPATCH", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK",
                           "SEARCH", "REPORT", "PURGE", "LINK", "UNLINK"})
_METHOD_TOKEN = re.compile(rb"[A-Z][A-Z_-]{0,31}")
_VERSION = re.compile(rb"HTTP/\d\.\d")
_CONDITIONALS = (hdrs.IF_NONE_MATCH, hdrs.IF_MODIFIED_SINCE, hdrs.IF_MATCH,
                 hdrs.IF_UNMODIFIED_SINCE, hdrs.RANGE)

OnServed = Callable[[str, os.stat_result], None]


class Worker:
    """What every connection of one worker process shares: files, clock, log, live connections."""

    def __init__(self, files: FileStore, *, log: AccessLog | None = None,
                 stats: SlotRecorder | None = None, on_served: OnServed | None = None,
                 keepalive_timeout: float = 15.0) -> None:
        self.files = files
        self.log = log
        self.stats = stats
        self.tally = Tally()
        # Parse results of single, bodiless requests by their exact bytes (see remember()).
        self.parsed: dict[bytes, list] = {}
        self.on_served = on_served
        self.keepalive_timeout = keepalive_timeout
        self.date = response.http_date(time.time())
        self.tick = 0
        self.conns: set[HttpConnection] = set()

    def clock(self) -> None:
        """Once per second: new Date value, log flush, idle keep-alive connections closed."""
        self.date = response.http_date(time.time())
        self.tick += 1
        self.files.tick = self.tick
        if self.log is not None:
            self.log.flush()
        self.tally.flush_into(self.stats)
        for conn in list(self.conns):
            conn.expire(self.tick)

    def remember(self, data: bytes, msgs: list) -> None:
        """Keep the parser's result for a whole bodiless request fed to an idle parser.

        llhttp is deterministic: the same bytes fed from the same (idle) state give the same
        message and leave the parser idle again, so a connection whose parser is idle can take
        the stored, immutable message instead of parsing again. Clients repeat byte-identical
        requests all the time (reloads, polling, keep-alive fetches); this saves the parse,
        about a sixth of the CPU of a small-file answer.
        """
        if len(self.parsed) >= MEMO_ENTRIES:
            self.parsed.clear()
        self.parsed[data] = msgs

    def protocol(self) -> HttpConnection:
        return HttpConnection(self)


class _Error:
    """A parse failure queued behind the requests parsed before it."""
    __slots__ = ("status", "line")

    def __init__(self, status: int, line: str) -> None:
        self.status = status
        self.line = line


class HttpConnection(asyncio.Protocol):
    _reading_paused = False  # read by aiohttp's StreamReader for request bodies

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser: HttpRequestParser | None = None
        self.queue: deque = deque()
        self.busy = False  # a sendfile task owns the socket
        self.write_paused = False
        self.closing = False
        self.peer_eof = False
        self.reading_paused = False
        self.last_active = worker.tick
        self.head_bytes = 0  # bytes of a header block still being received
        self.body = None  # request body being received (discarded)
        self.host = "-"
        self.job: asyncio.Task | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.dup_fd = -1
        self.parser_idle = True  # the parser holds no partial request
        self.t0 = 0.0  # when the data being answered arrived (for the latency histogram)
        self.answered = 0  # answers since t0

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = HttpRequestParser(
            self, asyncio.get_running_loop(), 1 << 30, max_line_size=URI_LIMIT,
            max_field_size=FIELD_LIMIT, max_headers=MAX_HEADERS, auto_decompress=False)
        if self.worker.log is not None:
            peer = transport.get_extra_info("peername")
            if peer:
                self.host = peer[0].removeprefix("::ffff:")
        self.worker.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.conns.discard(self)
        self.closing = True
        self.queue.clear()
        if self.job is not None:
            self.job.cancel()
        if self.linger is not None:
            self.linger.cancel()
        self._close_dup()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return  # lingering after an error: input is read and dropped
        worker = self.worker
        self.last_active = worker.tick
        if worker.stats is not None:
            self.t0 = time.perf_counter()
        idle = self.parser_idle
        msgs = worker.parsed.get(data) if idle else None
        if msgs is not None:
            upgraded = False  # a request parsed before from the same state: same result
        else:
            try:
                msgs, upgraded, _ = self.parser.feed_data(data)
            except HttpProcessingError as exc:
                self._queue_error(_parse_error_status(exc, data))
                return
            except Exception:  # the parser must never take the worker down
                self._queue_error(400)
                return
            # Between messages exactly when the bytes end with a complete bodiless request:
            # anything after a message but before the final CRLFCRLF would be its own head.
            self.parser_idle = (bool(msgs) and not upgraded and msgs[-1][1] is EMPTY_PAYLOAD
                                and data.endswith(b"\r\n\r\n"))
            if idle and self.parser_idle and len(msgs) == 1 and len(data) <= MEMO_REQUEST:
                worker.remember(data, msgs)
        if self.body is not None:
            self._drain_body()
        if (len(msgs) == 1 and not upgraded and not self.queue and not self.busy
                and not self.write_paused and self.head_bytes + len(data) <= HEAD_LIMIT
                and msgs[0][1] is EMPTY_PAYLOAD):
            self.head_bytes = 0  # the common case: one bodiless request, nothing waiting
            self._answer(msgs[0][0])
            return
        if msgs:
            big = self.head_bytes + len(data) > HEAD_LIMIT  # only then can a head be too big
            self.head_bytes = 0
            for msg, payload in msgs:
                if big and _head_size(msg) > HEAD_LIMIT:
                    self._queue_error(431)
                    return
                self.queue.append(msg)
                if payload is not EMPTY_PAYLOAD:
                    self.body = payload
                    self._drain_body()
            if upgraded:  # Upgrade/CONNECT: the parser reads no further requests
                self.queue.append(_Error(0, ""))
        elif self.body is None:
            self.head_bytes += len(data)
            if self.head_bytes > HEAD_LIMIT:
                self._queue_error(431)
                return
        self._run()

    def eof_received(self) -> bool:
        self.peer_eof = True
        if self.busy or self.queue:
            return True  # half-closed: finish the answers, then close
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_active = self.worker.tick
        if not self.busy:
            self._run()

    # called by aiohttp's StreamReader if a body piles up
    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass

    def expire(self, tick: int) -> None:
        """Close an idle keep-alive connection; drop a peer that stopped reading."""
        idle = tick - self.last_active
        if self.busy or self.closing:
            return
        if self.write_paused:
            if idle > SEND_TIMEOUT:
                self.transport.abort()
        elif not self.queue and idle > self.worker.keepalive_timeout:  # ticks: never early
            self.closing = True
            self.transport.close()

    # -- the request queue ------------------------------------------------------------------

    def _queue_error(self, status: int) -> None:
        self.queue.append(_Error(status, "-"))
        self._run()

    def _drain_body(self) -> None:
        body = self.body
        try:
            body.read_nowait()
        except Exception:
            self.body = None
            return
        if body.is_eof():
            self.body = None

    def _answer(self, msg) -> None:
        """One request when nothing else is queued: respond and write at once."""
        try:
            data, job, close = self._respond(msg)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._send_error_and_close(500, _request_line(msg))
            return
        self.transport.write(data)
        if self.answered:
            if self.worker.stats is not None:
                self.worker.tally.add_latency(time.perf_counter() - self.t0, self.answered)
            self.answered = 0
        if job is not None:
            self._start_job(job, close)
        elif close:
            self._close()
        elif self.peer_eof:
            self._close()

    def _start_job(self, job: list, close: bool) -> None:
        self.busy = True
        self.job = asyncio.get_running_loop().create_task(self._send_job(job, close))

    def _run(self) -> None:
        """Answer queued requests in order until one needs sendfile or the connection closes."""
        out: list[bytes] = []
        queue = self.queue
        while queue and not self.busy and not self.write_paused and not self.closing:
            item = queue.popleft()
            if type(item) is _Error:
                if item.status:
                    self._flush(out)
                    self._send_error_and_close(item.status, item.line)
                else:
                    self._flush(out)
                    self._close()
                return
            try:
                data, job, close = self._respond(item)
            except Exception:
                traceback.print_exc(file=sys.stderr)
                self._flush(out)
                self._send_error_and_close(500, _request_line(item))
                return
            out.append(data)
            if job is not None:
                self._flush(out)
                self._start_job(job, close)
                return
            if close:
                self._flush(out)
                self._close()
                return
        self._flush(out)
        if self.reading_paused and len(queue) < MAX_QUEUED // 2:
            self.reading_paused = False
            self.transport.resume_reading()
        elif not self.reading_paused and len(queue) >= MAX_QUEUED:
            self.reading_paused = True
            self.transport.pause_reading()
        if self.peer_eof and not queue and not self.busy and not self.closing:
            self._close()

    def _flush(self, out: list[bytes]) -> None:
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.answered:
            if self.worker.stats is not None:
                self.worker.tally.add_latency(time.perf_counter() - self.t0, self.answered)
            self.answered = 0

    def _close(self) -> None:
        self.closing = True
        self.queue.clear()
        self.transport.close()

    def _send_error_and_close(self, status: int, line: str) -> None:
        """An answer after which the request stream cannot be trusted: write, FIN, drain, close."""
        body = response.error_body(status)
        self.transport.write(response.simple_head(status, self.worker.date, len(body),
                                                  close=True) + body)
        self._account(None, status, len(body), line)
        self.closing = True
        self.queue.clear()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.linger = asyncio.get_running_loop().call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    # -- answering one request --------------------------------------------------------------

    def _respond(self, msg) -> tuple[bytes, list | None, bool]:
        """(bytes to write now, sendfile job or None, close after) for one parsed request."""
        version = msg.version
        if version is HttpVersion11:
            close = msg.should_close
        elif version == HttpVersion10:
            close = True  # HTTP/1.0: one request per connection
        else:
            return self._simple(msg, 505, close=True), None, True
        if msg.upgrade:
            close = True
        method = msg.method
        head_only = method == "HEAD"
        if not head_only and method != "GET":
            status = 405 if method in KNOWN_METHODS else 501
            return self._simple(msg, status, close=close, extra=ALLOW), None, close
        target = msg.path
        path = target if target[0] == "/" and "?" not in target and "#" not in target \
            else target_path(target)
        worker = self.worker
        found = worker.files.lookup(path, target)
        if type(found) is FileEntry:
            headers = msg.headers
            if (found.body is not None and not found.variants and found.announced
                    and hdrs.IF_NONE_MATCH not in headers and hdrs.RANGE not in headers
                    and hdrs.IF_MODIFIED_SINCE not in headers and hdrs.IF_MATCH not in headers
                    and hdrs.IF_UNMODIFIED_SINCE not in headers):
                # the hot path: a plain GET/HEAD of a small file already in memory
                tally = worker.tally
                tally.requests += 1
                tally.classes[2] += 1
                self.answered += 1
                if not head_only:
                    tally.bytes += found.st.st_size
                if worker.log is not None:
                    self._log(msg, 200, 0 if head_only else found.st.st_size)
                return found.answer_200(worker.date, close, head_only), None, close
            return self._file(msg, found, head_only, close)
        if type(found) is Redirect:
            return self._simple(msg, 301, close=close,
                                extra=[("Location", found.location)]), None, close
        if type(found) is Listing:
            page = self.worker.files.listing_html(found)
            if page is not None:
                head = response.simple_head(200, self.worker.date, len(page), close=close)
                self._account(msg, 200, 0 if head_only else len(page))
                return (head if head_only else head + page), None, close
        return self._simple(msg, 404, close=close), None, close

    def _simple(self, msg, status: int, *, close: bool, extra=()) -> bytes:
        body = response.error_body(status)
        head = response.simple_head(status, self.worker.date, len(body), extra=extra,
                                    close=close)
        head_only = msg.method == "HEAD"
        self._account(msg, status, 0 if head_only else len(body))
        return head if head_only else head + body

    def _file(self, msg, entry: FileEntry, head_only: bool,
              close: bool) -> tuple[bytes, list | None, bool]:
        worker = self.worker
        headers = msg.headers
        if entry.variants:
            coding = choose_coding(_joined(headers, hdrs.ACCEPT_ENCODING), tuple(entry.variants))
            if coding is not None:
                entry = worker.files.variant(entry, coding) or entry
        fd = -1
        if entry.body is None and not head_only:
            fd, entry = _open_current(entry)
            if fd < 0:
                return self._simple(msg, 404, close=close), None, close
        for name in _CONDITIONALS:
            if name in headers:
                break
        else:  # the common case: plain GET/HEAD
            return self._whole(msg, entry, head_only, close, fd)
        status = precondition_status(_Joined(headers), entry.etag, entry.last_modified,
                                     is_get_or_head=True)
        if status == 412 or status == 304:
            _close_fd(fd)
            if status == 412:
                return self._simple(msg, 412, close=close), None, close
            self._account(msg, 304, 0)
            return entry.head(304, worker.date, close), None, close
        rng = headers.get(hdrs.RANGE)
        if rng is not None and not head_only:
            if_range = headers.get(hdrs.IF_RANGE)
            if if_range is None or if_range_allows(if_range, entry.etag, entry.last_modified):
                ranges = parse_range(rng, entry.st.st_size)
                if ranges is not None:
                    return self._partial(msg, entry, ranges, close, fd)
        return self._whole(msg, entry, head_only, close, fd)

    def _whole(self, msg, entry: FileEntry, head_only: bool, close: bool,
               fd: int) -> tuple[bytes, list | None, bool]:
        worker = self.worker
        if worker.on_served is not None and not entry.announced and entry.coding is None:
            entry.announced = True  # once per file version and worker, not on every hit
            worker.on_served(entry.rel_path, entry.st)
        size = entry.st.st_size
        self._account(msg, 200, 0 if head_only else size)
        if entry.body is not None or head_only:
            return entry.answer_200(worker.date, close, head_only), None, close
        head = entry.head(200, worker.date, close)
        return head, [fd, (0, size)], close

    def _partial(self, msg, entry: FileEntry, ranges: list[tuple[int, int]], close: bool,
                 fd: int) -> tuple[bytes, list | None, bool]:
        worker = self.worker
        size = entry.st.st_size
        if not ranges:
            _close_fd(fd)
            return self._simple(msg, 416, close=close,
                                extra=[("Content-Range", f"bytes */{size}")]), None, close
        body = entry.body
        if len(ranges) == 1:
            first, last = ranges[0]
            length = last - first + 1
            head = response.partial_head(entry.st, entry.name, worker.date, length,
                                         content_range=f"bytes {first}-{last}/{size}",
                                         close=close, content_encoding=entry.coding,
                                         vary=entry.vary)
            self._account(msg, 206, length)
            if body is not None:
                return head + body[first:last + 1], None, close
            return head, [fd, (first, length)], close
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
        head = response.partial_head(entry.st, entry.name, worker.date, length,
                                     boundary=boundary, close=close,
                                     content_encoding=entry.coding, vary=entry.vary)
        self._account(msg, 206, length)
        if body is not None:
            return head + b"".join(p if type(p) is bytes else body[p[0]:p[0] + p[1]]
                                   for p in pieces), None, close
        return head, [fd, *pieces], close

    # -- sendfile for files not kept in memory -------------------------------------------------

    async def _send_job(self, job: list, close: bool) -> None:
        fd = job[0]
        transport = self.transport
        try:
            sock = transport.get_extra_info("socket").fileno()
            for piece in job[1:]:
                if type(piece) is bytes:
                    transport.write(piece)
                    continue
                offset, count = piece
                while transport.get_write_buffer_size():
                    await self._writable()
                while count:
                    try:
                        sent = os.sendfile(sock, fd, offset, count)
                    except BlockingIOError:
                        await self._writable()
                        continue
                    if sent == 0:
                        raise ConnectionError("file shrank while being sent")
                    offset += sent
                    count -= sent
                    self.last_active = self.worker.tick
        except asyncio.CancelledError:
            return
        except (OSError, ConnectionError, TimeoutError):
            transport.abort()
            return
        finally:
            _close_fd(fd)
            self._close_dup()
            self.job = None
        self.busy = False
        if close:
            self._close()
        else:
            self._run()

    async def _writable(self) -> None:
        """Wait until the socket takes more data (a dup of its fd, so the transport is untouched)."""
        loop = asyncio.get_running_loop()
        if self.dup_fd < 0:
            self.dup_fd = os.dup(self.transport.get_extra_info("socket").fileno())
        fut = loop.create_future()
        loop.add_writer(self.dup_fd, _set_done, fut)
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                await fut
        finally:
            loop.remove_writer(self.dup_fd)

    def _close_dup(self) -> None:
        if self.dup_fd >= 0:
            os.close(self.dup_fd)
            self.dup_fd = -1

    # -- access log ------------------------------------------------------------------------

    def _account(self, msg, status: int, body_bytes: int, line: str = "-") -> None:
        """Count one answer in the shared user-space stats and write its access-log line."""
        worker = self.worker
        tally = worker.tally
        tally.requests += 1
        tally.bytes += body_bytes
        tally.classes[status // 100] += 1
        self.answered += 1
        if worker.log is not None:
            self._log(msg, status, body_bytes, line)

    def _log(self, msg, status: int, body_bytes: int, line: str = "-") -> None:
        worker = self.worker
        if worker.log is not None:
            headers = msg.headers if msg is not None else {}
            worker.log.log(remote=self.host, when=time.time(),
                           request=_request_line(msg) if msg is not None else line,
                           status=status, body_bytes=body_bytes,
                           referer=headers.get(hdrs.REFERER),
                           user_agent=headers.get(hdrs.USER_AGENT), served_by="user")


# -- helpers ---------------------------------------------------------------------------------

def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _close_fd(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _open_current(entry: FileEntry) -> tuple[int, FileEntry]:
    """Open a file to be sent from disk; the validators follow what was actually opened."""
    try:
        fd = os.open(entry.fs_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return -1, entry
    st = os.fstat(fd)
    if not entry.matches(st):
        entry = FileEntry(fs_path=entry.fs_path, rel_path=entry.rel_path, name=entry.name, st=st,
                          etag=response.etag(st), last_modified=int(st.st_mtime), body=None,
                          coding=entry.coding, variants=entry.variants,
                          variants_tick=entry.variants_tick)
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


def _head_size(msg) -> int:
    """Bytes of a request's line and header block, as received."""
    return len(msg.path) + 16 + sum(len(k) + len(v) + 4 for k, v in msg.raw_headers)


def _request_line(msg) -> str:
    v = msg.version
    return f"{msg.method} {msg.path} HTTP/{v[0]}.{v[1]}"


def _parse_error_status(exc: HttpProcessingError, data: bytes) -> int:
    """The status for a request the parser refused (nginx-like where the RFC leaves a choice)."""
    if isinstance(exc, LineTooLong):
        return 414 if exc.args[1] == URI_LIMIT else 431
    message = getattr(exc, "message", "") or ""
    if "Too many headers" in message:
        return 431
    line = data.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    if isinstance(exc, BadHttpMethod):
        token = line.split(b" ", 1)[0]
        if _METHOD_TOKEN.fullmatch(token) and b" " in line:
            return 501  # a well-formed method we do not implement (RFC 9110 §15.6.2)
        return 400
    if isinstance(exc, BadStatusLine) and "HTTP version" in message:
        version = line.rsplit(b" ", 1)[-1]
        if _VERSION.fullmatch(version):
            return 505
    return 400
