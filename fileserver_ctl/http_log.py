"""Access log in the Combined Log Format, buffered and flushed once per second by the worker clock."""

from __future__ import annotations

import os
import time
from typing import IO


def _quote(value: str) -> str:
    """A header value or request line made safe inside a double-quoted log field."""
    out = value.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
    return out.replace("\\", "\\\\").replace('"', '\\"') if ('"' in out or "\\" in out) else out


class AccessLog:
    """`host - - [time] "request" status bytes "referer" "user-agent"` lines."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lines: list[str] = []
        self.stamp = ""
        self.tick()

    def tick(self) -> None:
        """Refresh the timestamp (local time, as nginx logs it) and flush what is buffered."""
        now = time.time()
        lt = time.localtime(now)
        off = lt.tm_gmtoff // 60
        sign = "+" if off >= 0 else "-"
        off = abs(off)
        self.stamp = time.strftime("%d/%b/%Y:%H:%M:%S", lt) + f" {sign}{off // 60:02d}{off % 60:02d}"
        self.flush()

    def log(self, host: str, request_line: str, status: int, size: int,
            referer: str | None, agent: str | None) -> None:
        self.lines.append(
            f'{host} - - [{self.stamp}] "{_quote(request_line)}" {status} '
            f'{size if size else "-"} "{_quote(referer) if referer else "-"}" '
            f'"{_quote(agent) if agent else "-"}"\n')
        if len(self.lines) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self.lines:
            return
        data = "".join(self.lines)
        self.lines.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a full disk or a closed stdout must not take the server down


def open_access_log(path: str | os.PathLike[str] | None, verbose: bool) -> AccessLog | None:
    """The log for the settings: a file (appended, shared by workers), stdout with -v, else none."""
    if path is not None:
        return AccessLog(open(path, "a", encoding="utf-8", buffering=1 << 16))
    if verbose:
        import sys
        return AccessLog(sys.stdout)
    return None
