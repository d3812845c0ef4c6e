"""The server's own figures over HTTP: `GET /_fileserver/stats.json`, which the demo page polls.

The body is what `fsctl stats --json -p PORT` prints for this server (stats.to_json of a
stats.read_snapshot), so the counters are listed in one place only. It is answered by user space
with `Cache-Control: no-store`, and only when the docroot has no file of that name (which the
kernel path would cache): a file wins on both paths alike.

A worker is not told its port, so it finds it once from the user-stats file its supervisor
created (userstats.py records the creating pid; the workers are that process's children).

Cost per request, measured on a live server: about 1 ms for counters, cache contents and
connections; `bpftool` for the program figures costs about 10 ms more, so those are re-read at
most every PROGRAMS_MAX_AGE seconds. A snapshot is reused for MAX_AGE seconds, so any number
of pollers cost one read per worker per MAX_AGE. Any failure (maps gone, server stopping)
becomes a 503 with a one-line JSON error, never an exception in the worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from . import response, stats
from .userstats import RUN_ROOT, UserStats

PATH = "/_fileserver/stats.json"
MAX_AGE = 0.5  # seconds one snapshot answers every poller of this worker
PROGRAMS_MAX_AGE = 5.0  # seconds between bpftool runs for the program figures
PORT_RETRY = 1.0  # seconds before looking for the port again after not finding it
JSON_TYPE = "application/json"
EXTRA_HEADERS = [("Cache-Control", "no-store")]


class _State:
    """What one worker process remembers between requests (reset in a forked child)."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.port: int | None = None
        self.port_looked = -PORT_RETRY
        self.body = b""
        self.status = 0
        self.taken = -MAX_AGE
        self.programs: tuple[stats.ProgramStats, ...] = ()
        self.programs_taken = -PROGRAMS_MAX_AGE
        self.last_error = ""


_state = _State()


def answer(head_only: bool, date: str, close: bool) -> tuple[bytes, int, int]:
    """The bytes to send for a GET/HEAD of PATH, the status, and the body bytes sent."""
    global _state
    if _state.pid != os.getpid():
        _state = _State()
    now = time.monotonic()
    if now - _state.taken >= MAX_AGE:
        _state.status, _state.body = _read(_state, now)
        _state.taken = now
    body = _state.body
    extra = EXTRA_HEADERS if _state.status == 200 else [*EXTRA_HEADERS, ("Retry-After", "1")]
    head = response.simple_head(_state.status, date, len(body), content_type=JSON_TYPE,
                                extra=extra, close=close)
    if head_only:
        return head, _state.status, 0
    return head + body, _state.status, len(body)


def _read(state: _State, now: float) -> tuple[int, bytes]:
    port = _own_port(state, now)
    if port is None:
        return _error(state, "this server keeps no shared counters (no user-stats file of its own)")
    fresh_programs = now - state.programs_taken < PROGRAMS_MAX_AGE
    try:
        snap = stats.read_snapshot(port, programs=not fresh_programs)
    except stats.NoServerError as exc:
        return _error(state, f"statistics unavailable: {exc}")
    except Exception as exc:  # the page's figures must never cost the worker
        return _error(state, f"statistics unreadable: {exc}")
    if fresh_programs:
        snap = dataclasses.replace(snap, programs=state.programs)
    else:
        state.programs, state.programs_taken = snap.programs, now
    state.last_error = ""
    figures = stats.to_json(snap)
    # Anyone who reaches the port reads this: aggregates only, no client addresses.
    figures.pop("top_clients", None)
    return 200, json.dumps(figures, indent=2).encode() + b"\n"


def _error(state: _State, message: str) -> tuple[int, bytes]:
    if message != state.last_error:  # once per new trouble, not once per poll
        print(f"fileserver: {PATH}: {message}", file=sys.stderr)
        state.last_error = message
    return 503, json.dumps({"error": message}).encode() + b"\n"


def _own_port(state: _State, now: float) -> int | None:
    if state.port is None and now - state.port_looked >= PORT_RETRY:
        state.port_looked = now
        state.port = find_port(os.getppid(), os.getpid())
    return state.port


def find_port(*pids: int) -> int | None:
    """The port whose user-stats file was created by one of `pids` (a worker's supervisor)."""
    try:
        names = sorted(d.name for d in RUN_ROOT.iterdir() if d.name.isdigit())
    except OSError:
        return None
    for name in names:
        try:
            with UserStats.open(int(name)) as us:
                if us.pid in pids:
                    return int(name)
        except (OSError, ValueError):
            continue  # another server's file going away, or not one of ours
    return None
