"""A second look at bytes llhttp refused: what nginx and RFC 9110/9112 accept, and what came first.

aiohttp runs llhttp in strict mode with no switch for the lenient flags, and a refusal loses the
requests parsed earlier in the same feed. So when a feed fails, the connection hands the bytes
received since its parser was last between messages to `reparse()`, which

1. mends each request head (`mend()`) so llhttp takes what nginx takes and the RFCs allow:
   HTTP/1.2-1.9 read as HTTP/1.1 (RFC 9110 §2.5), a bare LF as line end (RFC 9112 §2.2), raw
   non-ASCII bytes in the target percent-encoded (nginx serves them), the repeats of a header
   that aiohttp rejects but nginx ignores (User-Agent, Content-Type...) dropped, the first kept,
   Proxy-Connection dropped: llhttp reads it as Connection, so after `Proxy-Connection:
   close` it refuses whatever follows on the connection, which nginx (ignoring it) reads on;
   Upgrade dropped: llhttp reads no more HTTP after it, nginx ignores it and reads on; and a
   method llhttp does not know (FOO, PLAY, _X) put in a stand-in's place, so that the request
   is framed and answered (501) and the connection goes on, as nginx goes on after its 405;
   the request's own method is put back on the parsed message;
2. parses the mended bytes with a fresh parser: if that succeeds, it replaces the old one;
3. otherwise parses them once more one message at a time, so the requests that arrived complete
   before the bad one are answered in order before the error (RFC 9112 §9.3.2).

Only this error path pays for any of it; the common request never comes here.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

from aiohttp.http_exceptions import BadHttpMethod, BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD

MAX_MENDED_MESSAGES = 256  # more pipelined requests than this in one buffer are not walked
# aiohttp's singleton headers that nginx lets repeat; Host, Content-Length, Transfer-Encoding and
# Content-Range repeated stay errors (RFC 9110 §7.2, RFC 9112 §6.3: they frame or route the request).
_REPEAT_IGNORED = frozenset({b"user-agent", b"content-type", b"content-location", b"etag",
                             b"server", b"max-forwards"})
_REQUEST_LINE = re.compile(rb"([^ ]+ +)([^ ]+)( +HTTP/)(\d)\.(\d)")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_VERSION = re.compile(rb"HTTP/(\d)\.\d")
_WELL_FORMED_LINE = re.compile(rb"[A-Z_-]+ +[^ ]+ +HTTP/\d\.\d")
# A method as nginx reads one (upper case, "_", "-"); llhttp refuses those it does not know.
_METHOD = re.compile(rb"[A-Z_-]+")
_LLHTTP_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split())
STAND_IN = b"MKACTIVITY"  # known to llhttp, framed like any request, never served
_TRANSFER_ENCODING = re.compile(rb"^transfer-encoding[ \t]*:", re.I | re.M)

NewParser = Callable[[int], HttpRequestParser]  # max_msg_queue_size -> a fresh parser


class Reparsed(NamedTuple):
    parser: HttpRequestParser | None  # the parser to go on with; None: the stream is broken
    msgs: list  # (message, payload) pairs parsed from the whole buffer, in order
    upgraded: bool
    idle: bool  # the parser is between messages
    status: int  # when parser is None: the error answer after msgs (0: just close)
    head_only: bool = False  # ...and the refused request is a HEAD: the answer has no body


def reparse(data: bytes, new_parser: NewParser, uri_limit: int) -> Reparsed:
    """Parse `data` (bytes from a point where a parser was between messages) leniently.

    `uri_limit` is the parser's max_line_size, to tell a long target (414) from a long field.
    """
    mended, starts, methods = _mend(data)
    parser = new_parser(0)
    try:
        msgs, upgraded, _ = parser.feed_data(mended)
    except Exception:
        result = _salvage(mended, starts, new_parser(1), uri_limit)
        return result._replace(msgs=_own_methods(result.msgs, methods))
    idle = (bool(msgs) and not upgraded and msgs[-1][1] is EMPTY_PAYLOAD
            and mended.endswith(b"\r\n\r\n"))
    return Reparsed(parser, _own_methods(msgs, methods), upgraded, idle, 0)


def _own_methods(msgs, methods: dict[int, str]) -> list:
    """The parsed messages with the method each request named where a stand-in parsed it."""
    msgs = list(msgs)
    for i, method in methods.items():
        if i < len(msgs):
            msg, payload = msgs[i]
            msgs[i] = (msg._replace(method=method), payload)
    return msgs


def _salvage(data: bytes, starts: list[int], parser: HttpRequestParser,
             uri_limit: int) -> Reparsed:
    """The complete requests before the one llhttp refuses, and the status for that one."""
    good: list = []
    status = 400
    head = b""
    chunk = data
    try:
        while True:  # the parser pauses after each message (max_msg_queue_size=1)
            msgs, upgraded, _ = parser.feed_data(chunk)
            good.extend(msgs)
            if upgraded:
                status = 0  # nothing after an Upgrade is HTTP
                break
            if not msgs:
                break
            parser.message_consumed()
            chunk = b""
    except HttpProcessingError as exc:  # the request that follows the good ones
        if len(good) < len(starts):
            start = starts[len(good)]
            end = data.find(b"\r\n\r\n", start)
            head = data[start:] if end < 0 else data[start:end]
        status = error_status(exc, head, uri_limit)
    except Exception:
        pass
    if good and good[-1][0].should_close:
        status = 0  # the last good request ends the connection: nothing after it is read
    return Reparsed(None, good, False, False, status, head.startswith(b"HEAD "))


def is_head(data: bytes, skip: int) -> bool:
    """Whether the request after the first `skip` ones in `data` (bytes from a point where a
    parser was between messages) is a HEAD: its error answer is then sent without a body."""
    mended, starts = mend(data)
    return skip < len(starts) and mended.startswith(b"HEAD ", starts[skip])


def error_status(exc: HttpProcessingError, head: bytes, uri_limit: int) -> int:
    """The answer to a request llhttp refused; `head` is its request head when known."""
    if isinstance(exc, LineTooLong):
        return 414 if exc.args[1] == uri_limit else 431
    message = getattr(exc, "message", "") or ""
    if "Too many headers" in message:
        return 431
    line = head.split(b"\r\n", 1)[0]
    if isinstance(exc, BadHttpMethod):
        if _WELL_FORMED_LINE.fullmatch(line):
            return 501  # a well-formed method we do not implement (RFC 9110 §15.6.2)
        return 400  # no method, target and version: not a request line at all
    if isinstance(exc, BadStatusLine) and "HTTP version" in message:
        m = _VERSION.fullmatch(line.rsplit(b" ", 1)[-1])
        if m is not None and m.group(1) != b"0":
            return 505  # HTTP/2.0 and later; HTTP/0.x is a bad request, as nginx says
    if "Transfer-Encoding" in message and "Content-Length" not in message:
        # RFC 9112 §6.1: a coding the server does not understand SHOULD get 501, as nginx
        # answers one Transfer-Encoding other than "chunked"; the field repeated stays 400.
        if len(_TRANSFER_ENCODING.findall(head)) == 1:
            return 501
    return 400


# --- mending request heads -------------------------------------------------------------------

def mend(data: bytes) -> tuple[bytes, list[int]]:
    """`data` with each request head mended, and where each request starts in the result.

    Walks the buffer message by message: a head ends at its first empty line, a body is as
    long as its one Content-Length says; anything it cannot frame (Transfer-Encoding, a bad
    or repeated Content-Length, an unfinished head) is copied as it is and ends the walk.
    """
    mended, starts, _ = _mend(data)
    return mended, starts


def _mend(data: bytes) -> tuple[bytes, list[int], dict[int, str]]:
    """mend(), and the method of each request (by index) whose method a stand-in replaced."""
    out = bytearray()
    starts: list[int] = []
    methods: dict[int, str] = {}
    pos, size = 0, len(data)
    while pos < size and len(starts) < MAX_MENDED_MESSAGES:
        while data.startswith(b"\r\n", pos) or data.startswith(b"\n", pos):
            pos += 2 if data[pos] == 13 else 1  # empty lines before a request line are allowed
        if pos >= size:
            break
        starts.append(len(out))
        lines: list[bytes] = []
        end = pos
        complete = False
        while (nl := data.find(b"\n", end)) >= 0:
            line = data[end:nl].removesuffix(b"\r")
            end = nl + 1
            if not line:
                complete = True
                break
            lines.append(line)
        head = _mend_head(lines)
        if head and lines[0] != head[0] and head[0].startswith(STAND_IN + b" "):
            methods[len(starts) - 1] = lines[0].split(b" ", 1)[0].decode("ascii")
        out += b"".join(line + b"\r\n" for line in head)
        if not complete:
            out += data[end:]  # an unfinished line, kept for the parser to wait on
            return bytes(out), starts, methods
        out += b"\r\n"
        pos = end
        length = _body_length(lines)
        if length is None:
            out += data[pos:]
            return bytes(out), starts, methods
        out += data[pos:pos + length]
        pos += length
    out += data[pos:]
    return bytes(out), starts, methods


def _mend_head(lines: list[bytes]) -> list[bytes]:
    if not lines:
        return lines
    mended = [_mend_request_line(lines[0])]
    seen: set[bytes] = set()
    for line in lines[1:]:
        name = line.split(b":", 1)[0].lower()
        if name == b"proxy-connection":
            continue  # not Connection, whatever llhttp thinks (see http_answer.answer)
        if name == b"upgrade":
            continue  # ignored, as nginx ignores it (RFC 9110 §7.8): llhttp would stop there
        if name in _REPEAT_IGNORED:
            if name in seen:
                continue  # nginx keeps the first
            seen.add(name)
        mended.append(line)
    return mended


def _mend_request_line(line: bytes) -> bytes:
    m = _REQUEST_LINE.fullmatch(line)
    if m is None:
        return line
    method, target, http, major, minor = m.groups()
    name = method.rstrip(b" ")
    if name not in _LLHTTP_METHODS and _METHOD.fullmatch(name):
        method = STAND_IN + method[len(name):]  # put back on the message by _own_methods
    target = _NON_ASCII.sub(lambda c: b"%%%02X" % c.group()[0], target)
    if major == b"1" and minor not in (b"0", b"1"):
        minor = b"1"  # RFC 9110 §2.5: a later 1.x is answered as the highest we speak
    return method + target + http + major + b"." + minor


def _body_length(lines: list[bytes]) -> int | None:
    """Bytes of body after this head: 0, a valid single Content-Length, or None (can't frame)."""
    length = 0
    seen = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.lower()
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            value = value.strip(b" \t")
            if seen or not value.isdigit():
                return None
            seen = True
            length = int(value)
    return length
