"""One HTTP/1.1 connection: aiohttp's C request parser in, exact response bytes out.

aiohttp's web layer costs several times more per request than its parser (measured: 24k req/s
for a low-level `web.Server` handler against 78k for this design, one process, 1 KiB), and its
error pages and header order differ from what the kernel path sends; so a connection is a plain
asyncio Protocol that feeds aiohttp's llhttp-based parser and writes the bytes http_answer.py
builds. Pipelined requests are answered strictly in order through one queue; small files are
answered synchronously from memory, large ones with sendfile in a task that holds the queue
until the file is out. Bytes llhttp refuses get a second, lenient parse (http_lenient.py) from
the last message boundary: what nginx accepts is served, the requests before a bad one are
answered, then the bad one gets one error page and a lingering close.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
import traceback
from collections import deque

from aiohttp import hdrs
from aiohttp.http_parser import HttpRequestParser
from aiohttp.http_writer import HttpVersion10
from aiohttp.streams import EMPTY_PAYLOAD

from . import response
from .access_log import AccessLog
from .config import TIMEOUTS, env_seconds
from .http_answer import Answer, OnServed, answer, simple
from .http_files import FileStore
from .http_lenient import is_head, reparse
from .http_semantics import escapes_valid, target_authority, target_path, valid_host
from .http_stats import Tally
from .userstats import SlotRecorder

# nginx's limits (large_client_header_buffers 4 8k, max_headers 1000), answered 414 and 431
# where nginx says 414 and 400 (RFC 6585 §5 names the cause):
URI_LIMIT = 8192  # a request line with its CRLF longer than this: 414 (llhttp: the target)
FIELD_LIMIT = 16384  # one header line longer than this: 431 (nginx: 8 KiB, taken leniently)
HEAD_LIMIT = 32768  # a whole header block longer than this: 431 (nginx: four 8 KiB buffers)
MAX_HEADERS = 1000  # header fields (Host included) in one request; one more: 431
BODY_LIMIT = 1 << 20  # a Content-Length above this: 413 (nginx: client_max_body_size 1m)
MAX_QUEUED = 64  # parsed requests waiting for their turn before reading pauses
LINGER = 2.0  # seconds to drain input after an error answer, so the client sees it before RST
SEND_TIMEOUT = 60.0  # seconds without any progress while sending before the peer is dropped
HEADER_TIMEOUT = env_seconds("FILESERVER_HEADER_TIMEOUT", TIMEOUTS["FILESERVER_HEADER_TIMEOUT"])  # a whole head
MEMO_REQUEST = 2048  # longest request whose parse result is remembered...
MEMO_ENTRIES = 1024  # ...and how many are (cleared when full)
REPARSE_LIMIT = 2 * HEAD_LIMIT  # bytes since the last message boundary kept for _reparse
KEEP_ALIVE_10 = b"Connection: keep-alive\r\n"
_LINE_FRAME = len("  HTTP/1.1\r\n")  # a request line's bytes besides its method and target
# Defined as one value; repeated, the request is invalid (RFC 9110 §5.3) and nginx says 400.
_IMS, _IUS, _IF_RANGE = hdrs.IF_MODIFIED_SINCE, hdrs.IF_UNMODIFIED_SINCE, hdrs.IF_RANGE
_HOST = hdrs.HOST
_TE = hdrs.TRANSFER_ENCODING
_CL = hdrs.CONTENT_LENGTH
# A request line without a version (HTTP/0.9's simple request) alone in a feed: llhttp waits for
# a header block that such a client never sends, so it is refused at once (RFC 9112 §2.3).
_SIMPLE_REQUEST = re.compile(rb"[A-Z]+ +[^ \r\n]+\r?\n")
_good_hosts: set[str] = set()  # Host values found valid (cleared when large)


class Worker:
    """What every connection of one worker process shares: files, clock, log, live connections."""

    def __init__(self, files: FileStore, *, log: AccessLog | None = None,
                 stats: SlotRecorder | None = None, on_served: OnServed | None = None,
                 keepalive_timeout: float = TIMEOUTS["FILESERVER_KEEPALIVE_TIMEOUT"]) -> None:
        self.files = files
        self.log = log
        self.stats = stats
        self.tally = Tally()
        self.parsed: dict[bytes, list] = {}  # see remember()
        self.on_served = on_served
        self.keepalive_timeout = keepalive_timeout
        self.date = response.http_date(time.time())
        self.tick = 0
        self.conns: set[HttpConnection] = set()

    def clock(self) -> None:
        """Once per second: new Date value, log and stats flush, idle connections closed."""
        self.date = response.http_date(time.time())
        self.tick += 1
        self.files.tick = self.tick
        if self.log is not None:
            self.log.flush()
        self.tally.flush_into(self.stats)
        now = time.monotonic()
        for conn in list(self.conns):
            conn.expire(now)

    def remember(self, data: bytes, msgs: list) -> None:
        """Keep the parser's result for a whole bodiless request fed to an idle parser.

        llhttp is deterministic: the same bytes fed from the same (idle) state give the same
        message and leave the parser idle again, so a connection whose parser is idle can take
        the stored, immutable message instead of parsing again. Clients repeat byte-identical
        requests all the time (reloads, polling, keep-alive fetches); this saves the parse,
        about a fifth of the CPU of a small-file answer.
        """
        if len(self.parsed) >= MEMO_ENTRIES:
            self.parsed.clear()
        self.parsed[data] = msgs

    def protocol(self) -> HttpConnection:
        return HttpConnection(self)


class _Error:
    """A parse failure queued behind the requests parsed before it (status 0: just close);
    head_only: the refused request is a HEAD, so its answer has no body (RFC 9110 §9.3.2)."""
    __slots__ = ("status", "head_only")

    def __init__(self, status: int, head_only: bool = False) -> None:
        self.status = status
        self.head_only = head_only


class HttpConnection(asyncio.Protocol):
    _reading_paused = False  # read by aiohttp's StreamReader for request bodies

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser: HttpRequestParser | None = None
        self.parser_idle = True  # the parser holds no partial request
        self.unfinished: list[bytes] | None = None  # bytes fed since the parser was idle...
        self.unfinished_size = 0
        self.unfinished_msgs = 0  # ...and the requests parsed from them (see _reparse)
        self.queue: deque = deque()
        self.busy = False  # a sendfile task owns the socket
        self.write_paused = False
        self.reading_paused = False
        self.closing = False
        self.peer_eof = False
        self.last_active = time.monotonic()  # not the clock's tick: a late tick lags it
        self.head_bytes = 0  # bytes of a header block still being received...
        self.head_since = 0.0  # ...since then (time.monotonic())
        self.body = None  # request body being received (read and dropped)
        self.host = "-"
        self.job: asyncio.Task | None = None
        self.linger: asyncio.TimerHandle | None = None
        self.dup_fd = -1
        self.t0 = 0.0  # when the data being answered arrived (for the latency histogram)
        self.answered = 0  # answers since t0

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.parser = self._new_parser(0)
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
        self.last_active = time.monotonic()
        if worker.stats is not None:
            self.t0 = time.perf_counter()
        idle = self.parser_idle
        msgs = worker.parsed.get(data) if idle else None
        if msgs is not None:
            upgraded = False  # parsed before from the same (idle) state: the same result
        else:
            try:
                msgs, upgraded, _ = self.parser.feed_data(data)
            except Exception:  # refused (or a parser bug: it must never take the worker down)
                self._reparse(data, idle)
                return
            if not msgs and idle and _SIMPLE_REQUEST.fullmatch(data):
                self._take((), False, len(data), 400)
                return
            if msgs and msgs[-1][0].upgrade and msgs[-1][0].method != "CONNECT":
                # Upgrade asked: llhttp stops reading HTTP there (and drops what follows an
                # h2c one); this server ignores Upgrade as nginx does (RFC 9110 §7.8), so the
                # bytes are parsed again without the field and the connection goes on
                self._reparse(data, idle)
                return
            if (msgs and (len(msgs) > 1 or request_error(msgs[0][0]))
                    and self._take_refused(msgs, len(data))):
                return
            # Between messages exactly when the bytes end with a complete bodiless request:
            # anything after a message but before the final CRLFCRLF would be its own head.
            self.parser_idle = (bool(msgs) and not upgraded and msgs[-1][1] is EMPTY_PAYLOAD
                                and data.endswith(b"\r\n\r\n"))
            if not self.parser_idle:
                self._keep_unfinished(data, idle, len(msgs))
            else:
                self.unfinished = None
                if idle and len(msgs) == 1 and len(data) <= MEMO_REQUEST:
                    worker.remember(data, msgs)
        if self.body is not None:
            self._drain_body()
        if (len(msgs) == 1 and not upgraded and not self.queue and not self.busy
                and not self.write_paused and self.head_bytes + len(data) <= HEAD_LIMIT
                and msgs[0][1] is EMPTY_PAYLOAD):
            self.head_bytes = 0  # the common case: one bodiless request, nothing waiting
            self._answer_now(msgs[0][0])
            return
        self._take(msgs, upgraded, len(data))

    def _take(self, msgs, upgraded: bool, size: int, error: int = -1,
              head_only: bool = False) -> None:
        """Queue parsed requests (and after them the answer `error` if >= 0, without a body
        if head_only), then answer."""
        if msgs:
            big = self.head_bytes + size > HEAD_LIMIT  # only then can a head be too big
            self.head_bytes = 0
            for msg, payload in msgs:
                if big and _head_size(msg) > HEAD_LIMIT:
                    self._queue_error(431, msg.method == "HEAD")
                    return
                self.queue.append(msg)
                if payload is not EMPTY_PAYLOAD:
                    self.body = payload
                    self._drain_body()
            if upgraded:  # Upgrade/CONNECT: the parser reads no further requests
                self.queue.append(_Error(0))
        elif self.body is None and error < 0:
            if not self.head_bytes:
                self.head_since = time.monotonic()
            self.head_bytes += size
            if self.head_bytes > HEAD_LIMIT:
                self._queue_error(431, self._unfinished_is_head())
                return
        if error >= 0:
            self.queue.append(_Error(error, head_only))
        self._run()

    def _take_refused(self, msgs, size: int) -> bool:
        """Queue the requests before the first one to refuse, then its error answer (the head
        alone for a HEAD); False, queuing nothing, when none is refused."""
        refused = _refusal(msgs)
        if refused is None:
            return False
        i, status = refused
        self._take(msgs[:i], False, size, status, msgs[i][0].method == "HEAD")
        return True

    def _new_parser(self, max_queue: int) -> HttpRequestParser:
        """llhttp through aiohttp; max_queue=1 pauses after each message (see http_lenient)."""
        return HttpRequestParser(
            self, asyncio.get_running_loop(), 1 << 30, max_line_size=URI_LIMIT,
            max_field_size=FIELD_LIMIT, max_headers=MAX_HEADERS, auto_decompress=False,
            max_msg_queue_size=max_queue)

    def _keep_unfinished(self, data: bytes, was_idle: bool, count: int) -> None:
        """Remember the bytes since the parser was last between messages, for _reparse."""
        if was_idle:
            self.unfinished, self.unfinished_size, self.unfinished_msgs = [], 0, 0
        elif self.unfinished is None:
            return
        self.unfinished_size += len(data)
        if self.unfinished_size > REPARSE_LIMIT:
            self.unfinished = None  # a long body: too much to parse again
        else:
            self.unfinished.append(data)
            self.unfinished_msgs += count

    def _reparse(self, data: bytes, idle: bool) -> None:
        """The parser refused `data`: parse again leniently from the last message boundary.

        Requests parsed from those bytes before were queued already and are skipped; a mended
        stream goes on with the new parser, a broken one gets its good requests answered, then
        the error answer and a lingering close.
        """
        if idle:
            buffered, skip = data, 0
        elif self.unfinished is not None:
            buffered, skip = b"".join(self.unfinished) + data, self.unfinished_msgs
        else:
            self._take((), False, len(data), 400)
            return
        try:
            result = reparse(buffered, self._new_parser, URI_LIMIT)
        except Exception:  # a bug here must cost one connection, never the worker
            traceback.print_exc(file=sys.stderr)
            self._take((), False, len(data), 400)
            return
        msgs = result.msgs
        self.body = None  # the old parser's body reader gets nothing more
        for _, payload in msgs[:skip]:  # bodies of requests already answered, fed anew
            if payload is not EMPTY_PAYLOAD:
                self.body = payload
                self._drain_body()
        msgs = msgs[skip:]
        if self._take_refused(msgs, len(data)):
            return
        if result.parser is None:
            self._take(msgs, False, len(data), result.status, result.head_only)
        else:
            self.parser = result.parser
            self.parser_idle = result.idle
            if not result.idle:
                self._keep_unfinished(buffered, True, len(result.msgs))
            self._take(msgs, result.upgraded, len(data))

    def eof_received(self) -> bool:
        self.peer_eof = True
        if self.busy or self.queue:
            return True  # half-closed: finish the answers, then close
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_active = time.monotonic()
        if not self.busy:
            self._run()

    # aiohttp's StreamReader calls these when a request body piles up; bodies are drained
    # right after every feed, so there is nothing to pause.
    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass

    def expire(self, now: float) -> None:
        """Once a second (`now` is time.monotonic()): close an idle keep-alive connection, cut
        off slow heads and readers. Times are the clock's, not counted ticks: a tick that runs
        late is followed by the next a moment later, and counting them closed connections
        early."""
        idle = now - self.last_active
        if self.busy or self.closing:
            return
        if self.write_paused:
            if idle >= SEND_TIMEOUT:
                self.transport.abort()
        elif self.head_bytes and now - self.head_since >= HEADER_TIMEOUT:
            # a head trickling in byte by byte (slowloris)
            self._send_error_and_close(408, self._unfinished_is_head())
        elif not self.queue and idle >= self.worker.keepalive_timeout:
            self.closing = True
            self.transport.close()

    # -- answering, in order -----------------------------------------------------------------

    def _respond(self, msg):
        worker = self.worker
        try:
            ans = answer(msg, worker.files, worker.date, worker.on_served)
        except Exception:  # a bug must cost one connection, never the worker
            traceback.print_exc(file=sys.stderr)
            ans = simple(msg, 500, worker.date, close=True)
        if msg.version is HttpVersion10 and not ans.close:
            ans = _announce_keep_alive(ans)
        tally = worker.tally
        tally.requests += 1
        tally.bytes += ans.body_bytes
        tally.classes[ans.status // 100] += 1
        self.answered += 1
        if worker.log is not None:
            self._log(_request_line(msg), ans.status, ans.body_bytes, msg.headers)
        return ans

    def _answer_now(self, msg) -> None:
        """One request when nothing else is queued: respond and write at once."""
        data, job, close, _, _ = self._respond(msg)
        self.transport.write(data)
        self._latency()
        if job is not None:
            self._start_job(job, close)
        elif close or self.peer_eof:
            self._close()

    def _run(self) -> None:
        """Answer queued requests in order until one needs sendfile or the connection closes."""
        out: list[bytes] = []
        queue = self.queue
        while queue and not self.busy and not self.write_paused and not self.closing:
            item = queue.popleft()
            if type(item) is _Error:
                self._flush(out)
                if item.status:
                    self._send_error_and_close(item.status, item.head_only)
                else:
                    self._close()
                return
            data, job, close, _, _ = self._respond(item)
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
        self._latency()

    def _latency(self) -> None:
        if self.answered:
            if self.worker.stats is not None:
                self.worker.tally.add_latency(time.perf_counter() - self.t0, self.answered)
            self.answered = 0

    def _queue_error(self, status: int, head_only: bool = False) -> None:
        self.queue.append(_Error(status, head_only))
        self._run()

    def _unfinished_is_head(self) -> bool:
        """Whether the request whose head is still arriving is a HEAD (from the bytes kept
        since the parser was last between messages; False when they were not kept)."""
        if not self.unfinished:
            return False
        try:
            return is_head(b"".join(self.unfinished), self.unfinished_msgs)
        except Exception:  # only the error page's body depends on it
            return False

    def _drain_body(self) -> None:
        body = self.body
        try:
            body.read_nowait()
        except Exception:
            self.body = None
            return
        if body.is_eof():
            self.body = None

    def _close(self) -> None:
        self.closing = True
        self.queue.clear()
        self.transport.close()

    def _send_error_and_close(self, status: int, head_only: bool = False) -> None:
        """An answer after which the request stream cannot be trusted: write, FIN, drain, close.

        Closing at once with unread input makes the kernel send RST, which can destroy the
        error page before the client reads it; so the write side is shut and input is read and
        dropped for LINGER seconds (as nginx's lingering_close does).
        """
        worker = self.worker
        data, _, _, _, body_bytes = simple(None, status, worker.date, close=True,
                                           head_only=head_only)
        self.transport.write(data)
        tally = worker.tally
        tally.requests += 1
        tally.bytes += body_bytes
        tally.classes[status // 100] += 1
        if worker.log is not None:
            self._log("-", status, body_bytes, {})
        self.closing = True
        self.queue.clear()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.linger = asyncio.get_running_loop().call_later(LINGER, self.transport.close)
        else:
            self.transport.close()

    def _log(self, line: str, status: int, body_bytes: int, headers) -> None:
        self.worker.log.log(remote=self.host, when=time.time(), request=line, status=status,
                            body_bytes=body_bytes, referer=headers.get(hdrs.REFERER),
                            user_agent=headers.get(hdrs.USER_AGENT), served_by="user")

    # -- sendfile for files not kept in memory -------------------------------------------------

    def _start_job(self, job: list, close: bool) -> None:
        self.busy = True
        self.job = asyncio.get_running_loop().create_task(self._send_job(job, close))

    async def _send_job(self, job: list, close: bool) -> None:
        """Send [fd, piece...]: bytes through the transport, (offset, count) with sendfile."""
        fd = job[0]
        transport = self.transport
        try:
            sock = transport.get_extra_info("socket").fileno()
            for piece in job[1:]:
                if type(piece) is bytes:
                    transport.write(piece)
                    continue
                offset, count = piece
                while transport.get_write_buffer_size():  # the head goes out first
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
                    self.last_active = time.monotonic()
        except asyncio.CancelledError:
            return
        except (OSError, ConnectionError, TimeoutError):
            transport.abort()  # the client cannot get the promised Content-Length any more
            return
        finally:
            os.close(fd)
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


def _set_done(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _head_size(msg) -> int:
    """Bytes of a request's line and header block, as received."""
    return len(msg.path) + 16 + sum(len(k) + len(v) + 4 for k, v in msg.raw_headers)


def _request_line(msg) -> str:
    v = msg.version
    return f"{msg.method} {msg.path} HTTP/{v[0]}.{v[1]}"


def _refusal(msgs) -> tuple[int, int] | None:
    """(index, status) of the first parsed request that must be refused, None if none."""
    for i, (msg, _) in enumerate(msgs):
        status = request_error(msg)
        if status:
            return i, status
    return None


def request_error(msg) -> int:
    """400 (or 413, 414, 501) for a request llhttp lets through but RFC 9110/9112 (and nginx)
    refuse; else 0.

    Runs once per freshly parsed request (a remembered parse was checked when it was parsed),
    so it is kept to a few dictionary lookups for a plain request.
    """
    if len(msg.method) + len(msg.path) > URI_LIMIT - _LINE_FRAME:
        return 414  # the line (llhttp bounds only the target) does not fit nginx's buffer
    headers = msg.headers
    host = headers.get(_HOST)
    if host is not None and host not in _good_hosts:
        if not valid_host(host):
            return 400  # RFC 9110 §7.2: a Host with an invalid value
        if len(_good_hosts) >= 1024:
            _good_hosts.clear()
        _good_hosts.add(host)
    te = headers.get(_TE)
    if te is not None:
        if msg.version < (1, 1):
            return 400  # RFC 9112 §6.1: HTTP/1.0 framing with Transfer-Encoding counts as faulty
        if te.strip(" \t").lower() != "chunked":
            # RFC 9112 §6.1: a coding the server does not understand SHOULD get 501; llhttp
            # takes any list ending in chunked ("gzip, chunked") or an empty one, nginx only
            # "chunked" itself
            return 501
    target = msg.path
    if target[0] != "/":
        authority = target_authority(target)
        if authority is not None and ("@" in authority or not valid_host(authority)):
            return 400  # RFC 9110 §4.2.4: userinfo in an http(s) target is an error, as nginx says
    if "%" in target and not escapes_valid(target_path(target)):
        return 400  # RFC 9112 §3.2: an invalid request-target
    if (_IMS in headers or _IUS in headers or _IF_RANGE in headers) and any(
            len(headers.getall(name, ())) > 1 for name in (_IMS, _IUS, _IF_RANGE)):
        return 400
    length = headers.get(_CL)
    if length is not None and length.isdigit() and int(length) > BODY_LIMIT:
        # RFC 9110 §15.5.14: content larger than the server takes, whatever the method or
        # target (nginx checks it first: 413 rather than 404 or 405); not read, the
        # connection closes
        return 413
    return 0


def _announce_keep_alive(ans: Answer) -> Answer:
    """An HTTP/1.0 connection persists only when the answer says so (RFC 9112 §C.2.2)."""
    data = ans.data
    end = data.find(b"\r\n\r\n") + 2
    return ans._replace(data=data[:end] + KEEP_ALIVE_10 + data[end:])
