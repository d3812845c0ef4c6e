"""Access log in nginx's Combined Log Format, written by both paths, each line marked with its path.

    127.0.0.1 - - [25/Nov/2025:16:04:05 +0000] "GET /index.html HTTP/1.1" 200 1024 "-" "curl/8.0" "kernel"

The user-space server calls `AccessLog.log(...)` after each response (every worker appends to the
same file with O_APPEND, one write() per line, so lines never interleave). Responses the kernel
answered arrive as `struct fs_event` records on the `events` ring buffer; `KernelEventLog` drains
them into the same log from a thread of the server's parent process.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from .policy import client_address

_logger = logging.getLogger("fileserver.access_log")

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
# nginx's default log escaping: '"', '\' and bytes outside 0x20..0x7e become \xHH.
_ESCAPE = {b: f"\\x{b:02X}" for b in range(256) if b < 0x20 or b > 0x7E or b in (0x22, 0x5C)}

EVENT_STRUCT = "struct fs_event"
RESPONSE_EVENT = "FS_EVENT_RESPONSE"  # enum fs_event_type member of a kernel answer
# HTTP method codes in fs_event.method: the kernel path answers only these two.
_METHODS = {1: "GET", 2: "HEAD"}


def escape(value: str | bytes) -> str:
    """Escape a logged field the way nginx does, so a request can't forge log fields or lines."""
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
    return "".join(_ESCAPE.get(b) or chr(b) for b in raw)


def time_local(ts: float) -> str:
    """nginx's $time_local: 25/Nov/2025:16:04:05 +0100 (English month, local offset)."""
    t = _dt.datetime.fromtimestamp(ts).astimezone()
    return f"{t.day:02d}/{_MONTHS[t.month - 1]}/{t.year}:{t:%H:%M:%S} {t:%z}"


def format_entry(*, remote: str, when: float, request: str | bytes, status: int, body_bytes: int,
                 referer: str | None = None, user_agent: str | None = None,
                 served_by: str = "user") -> str:
    """One Combined Log Format line (no newline) with the serving path as a last quoted field.

    `request` is the request line as received ("GET /a HTTP/1.1"); `body_bytes` is what nginx
    logs as $body_bytes_sent (0 for HEAD and 304).
    """
    return (f'{remote} - - [{time_local(when)}] "{escape(request)}" {status} {body_bytes} '
            f'"{escape(referer or "-")}" "{escape(user_agent or "-")}" "{served_by}"')


class AccessLog:
    """Appends lines to a file ("-" means standard output); safe to share across worker processes.

    Each flush is one write() of whole lines to an O_APPEND descriptor, so lines of different
    workers never interleave. With `buffer_lines` > 0 lines are kept until that many are
    waiting or flush() is called (a worker calls it from its once-a-second clock).
    A failing write (full disk, closed stdout) drops the lines and never takes the server down.
    """

    def __init__(self, path: str | Path, *, buffer_lines: int = 0) -> None:
        self.path = str(path)
        self.buffer_lines = buffer_lines
        self._lines: list[str] = []
        self.dropped = 0
        if self.path == "-":
            self._fd = os.dup(1)
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def write(self, line: str) -> None:
        self._lines.append(line)
        if len(self._lines) > self.buffer_lines:
            self.flush()

    def log(self, **entry: Any) -> None:
        """`format_entry(**entry)` and write it."""
        self.write(format_entry(**entry))

    def flush(self) -> None:
        if not self._lines or self._fd < 0:
            return
        data = ("\n".join(self._lines) + "\n").encode("utf-8", "surrogateescape")
        lines, self._lines = len(self._lines), []
        try:
            os.write(self._fd, data)
        except OSError as exc:
            self.dropped += lines
            _logger.warning("access log %s: %s (%d lines dropped)", self.path, exc.strerror, lines)

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AccessLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def event_entry(event: dict[str, Any], *, mono_to_wall: float) -> dict[str, Any]:
    """Turn one decoded response event into `format_entry` keyword arguments.

    `mono_to_wall` is time.time() - time.monotonic(): the event's timestamp comes from
    bpf_ktime_get_ns(), i.e. CLOCK_MONOTONIC.
    """
    path = event["key"]["path"].split(b"\0", 1)[0]
    method = _METHODS.get(event["method"], "-")
    request = method.encode() + b" " + path + b" HTTP/1." + str(event["http_minor"]).encode()
    raw = b"".join(w.to_bytes(4, sys.byteorder) for w in event["client_addr"])
    return dict(remote=client_address(event["family"], raw),
                when=event["ts_ns"] / 1e9 + mono_to_wall, request=request,
                status=event["status"], body_bytes=event["body_bytes"], served_by="kernel")


class KernelEventLog:
    """Drains the kernel's `events` ring buffer into an AccessLog.

    `abi` is libbpf.Abi over the header that defines `struct fs_event` (bpf/fileserver.h);
    `ring_buffer` is a factory `callback -> object with poll(timeout_ms)`, e.g.
    `lambda cb: libbpf.RingBuffer(maps["events"], cb)`. Records of other event types
    (hand-off reasons) are counted and skipped.
    """

    def __init__(self, ring_buffer: Callable[[Callable[[bytes], Any]], Any], abi: Any, log: AccessLog) -> None:
        self._abi = abi
        self._log = log
        self._size = abi.sizeof(EVENT_STRUCT)
        try:
            self._response_type = abi.enum("fs_event_type")[RESPONSE_EVENT]
        except KeyError:
            raise LookupError(f"{getattr(abi, 'path', 'the ABI header')} defines no {RESPONSE_EVENT}: "
                              "the kernel path does not report its responses") from None
        self._ring = ring_buffer(self.handle)
        self.written = 0
        self.skipped = 0

    def handle(self, data: bytes) -> int:
        """Ring-buffer callback: one response record -> one log line. Returns 0 to go on."""
        if len(data) < self._size:
            self.skipped += 1
            return 0
        event = self._abi.unpack(EVENT_STRUCT, data)
        if event["type"] != self._response_type:
            self.skipped += 1
            return 0
        self._log.log(**event_entry(event, mono_to_wall=time.time() - time.monotonic()))
        self.written += 1
        return 0

    def poll(self, timeout_ms: int = 100) -> None:
        self._ring.poll(timeout_ms)

    def run(self, stop: threading.Event, timeout_ms: int = 100) -> None:
        """Poll until `stop` is set (run it in a thread of the server's parent); a buffered log
        is flushed at least once a second."""
        flushed = time.monotonic()
        while not stop.is_set():
            self.poll(timeout_ms)
            if time.monotonic() - flushed >= 1.0:
                self._log.flush()
                flushed = time.monotonic()
        self._log.flush()

    def close(self) -> None:
        """Free the ring buffer (the log itself belongs to the caller)."""
        close = getattr(self._ring, "close", None)
        if close is not None:
            close()

