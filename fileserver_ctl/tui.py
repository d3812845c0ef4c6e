"""`fsctl top`: a live screen of what the kernel path and user space serve, readable in 80x24.

`render(snapshot, rates)` is pure (tested with a capture console); `run_top` drives it with
rich's Live, one frame a second, and reads q from the terminal without blocking.

A frame stays within FRAME_LINES (23: Live writes a newline after the last line, so a 24th
would scroll the header out of a 24-line terminal): each table names itself in its first
column header instead of a title line, and top files share their rows with the BPF programs.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import time
import tty
from typing import Iterator, TextIO

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import stats
from .stats import Rates, Snapshot

REFRESH_SECONDS = 1.0
FRAME_LINES = 23
FILE_WIDTH = 24  # longest file path shown before eliding with "…"
CLIENT_WIDTH = 25  # longest client address shown (an IPv6 one is elided at the front)
PROGRAM_PREFIX = "fileserver_"  # every program of the object is named so; the screen drops it


def fmt_count(n: float) -> str:
    return f"{n:,.0f}"


def fmt_short(n: float) -> str:
    """A count in at most 7 characters, for the narrow top tables: 999,999 then 1.2 M, 3.4 G..."""
    if abs(n) < 1_000_000:
        return fmt_count(n)
    for unit, scale in (("M", 1e6), ("G", 1e9), ("T", 1e12), ("P", 1e15)):
        if abs(n) < 999.95 * scale or unit == "P":  # 999.95 M would print as 1,000.0 M
            return f"{n / scale:,.1f} {unit}"
    raise AssertionError("unreachable")


def fmt_rate(n: float | None) -> str:
    return "-" if n is None else f"{n:,.1f}"


def fmt_short_rate(n: float | None) -> str:
    """fmt_rate up to 999,999.9, then as fmt_short (XDP alone may run millions of times a second)."""
    return fmt_rate(n) if n is None or abs(n) < 999_999.95 else fmt_short(n)


def fmt_bytes(n: float | None) -> str:
    """1023 B, 1.0 KiB, 12.3 MiB ..."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def fmt_duration(seconds: float) -> str:
    """3d 04:05:06 / 04:05:06."""
    s = int(max(seconds, 0))
    days, s = divmod(s, 86400)
    text = f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return f"{days}d {text}" if days else text


def fmt_ago(seconds: float) -> str:
    """How long ago: 0.4 s, 12 s, 4 min, 2 h."""
    if seconds < 10:
        return f"{max(seconds, 0):.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    return f"{seconds // 3600:.0f} h"


def _elide(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _table(*columns: str) -> Table:
    """A table whose first column header is its title (bold), the rest right-aligned figures."""
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False, header_style="")
    for i, name in enumerate(columns):
        t.add_column(Text(name, style="bold") if i == 0 else name, justify="left" if i == 0 else "right",
                     no_wrap=True)
    return t


def _traffic(snap: Snapshot, r: Rates | None) -> Table:
    t = _table("Requests", "req/s", "bytes/s", "responses", "bytes")
    t.add_row("kernel", fmt_rate(r and r.kernel_rps), fmt_bytes(r and r.kernel_bps),
              fmt_count(snap.kernel_responses), fmt_bytes(snap.kernel_bytes))
    t.add_row("user", fmt_rate(r and r.user_rps), fmt_bytes(r and r.user_bps),
              fmt_count(snap.user_responses), fmt_bytes(snap.user.bytes))
    return t


def _summary(snap: Snapshot, r: Rates | None) -> Text:
    rate = r.hit_rate if r and r.hit_rate is not None else stats.hit_rate(snap)
    text = Text.assemble(
        ("hit rate ", "bold"), fmt_percent(rate),
        ("   cached ", "bold"), f"{fmt_count(snap.cached_files)} files, {fmt_bytes(snap.cached_bytes)}")
    if "used" in snap.cache and "budget" in snap.cache:  # kernel memory, as the budget counts it
        text.append(f" in {fmt_bytes(snap.cache['used'])} of {fmt_bytes(snap.cache['budget'])}")
    if snap.kernel_path:  # live conn_track entries by state; hand-offs counted since start
        text.append_text(Text.assemble(
            ("\nconnections ", "bold"), f"owned {fmt_count(snap.connections_owned)}",
            f", handed off {fmt_count(snap.connections.get('handed_off', 0))}",
            f" ({fmt_count(snap.handed_off)} since start)"))
        if drops := stats.xdp_drops(snap.counters):
            text.append_text(Text.assemble(("\nXDP dropped ", "bold"), ", ".join(
                f"{reason} {fmt_count(n)}" for reason, n in drops.items())))
    return text


def _files(snap: Snapshot) -> Table:
    files = _table("Top files", "hits")
    for f in snap.top_files[: stats.TOP_N]:
        files.add_row(_elide(f.path, FILE_WIDTH), fmt_short(f.hits))
    return files


def _programs(snap: Snapshot, r: Rates | None) -> Table:
    t = _table("BPF program", "runs/s", "avg ns", "runs")
    for p in snap.programs:
        per_s, avg = r.programs.get(p.id, (None, None)) if r else (None, None)
        if avg is None and p.run_cnt:
            avg = p.run_time_ns / p.run_cnt
        t.add_row(p.name.removeprefix(PROGRAM_PREFIX), fmt_short_rate(per_s), fmt_short_rate(avg),
                  fmt_short(p.run_cnt))
    return t


def _clients(snap: Snapshot) -> Table:
    """The busiest clients as XDP counted them (client_stats), TOP_N rows."""
    t = _table("Top clients", "conns", "requests", "bytes in", "dropped", "seen")
    for c in snap.top_clients[: stats.TOP_N]:
        t.add_row(_elide(c.addr, CLIENT_WIDTH), fmt_short(c.connections), fmt_short(c.requests),
                  fmt_bytes(c.bytes), fmt_short(c.dropped), fmt_ago(c.last_seen))
    return t


def render(snap: Snapshot, r: Rates | None) -> RenderableType:
    """One frame of `fsctl top` from a snapshot and the rates since the previous one."""
    mode = "kernel path on" if snap.kernel_path else "kernel path off (-n)"
    header = Text.assemble(("fileserver ", "bold"), f":{snap.port}   up {fmt_duration(snap.uptime)}   {mode}   ",
                           ("q or Ctrl-C quits", "dim"))
    parts: list[RenderableType] = [header, _traffic(snap, r), _summary(snap, r)]
    if snap.kernel_path:
        middle = Table.grid(padding=(0, 3))
        middle.add_row(_files(snap), _programs(snap, r))
        parts += [middle, _clients(snap)]
    return Group(*parts)


@contextlib.contextmanager
def _cbreak(stream: TextIO) -> Iterator[int | None]:
    """Put the terminal in cbreak mode (keys arrive unbuffered, Ctrl-C still signals); restore it."""
    if not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int | None, seconds: float) -> bool:
    """Sleep up to `seconds`; True as soon as q is pressed."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 32)
            if not key or b"q" in key.lower():  # EOF on the terminal counts as quit too
                return True
    return False


@contextlib.contextmanager
def _exit_on_hangup() -> Iterator[None]:
    """SIGHUP (terminal closed) and SIGTERM leave like q does, so the terminal and
    kernel.bpf_stats_enabled are restored on the way out."""
    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    saved = {}
    try:
        for sig in (signal.SIGHUP, signal.SIGTERM):
            saved[sig] = signal.signal(sig, leave)
    except ValueError:
        pass  # not the main thread: keep the defaults
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def run_top(port: int, once: bool = False, *, console: Console | None = None,
            frames: int | None = None) -> int:
    """Show `fsctl top` for the server on `port` until q or Ctrl-C; exit status 0.

    With `once`, print a single frame (rates over one second) and return. `frames` bounds the
    number of refreshes (tests). Raises NoServerError when no server runs on the port, and when
    the server stops while the screen is up (after the terminal is restored).
    """
    console = console or Console()
    reader = stats.StatsReader(port)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_exit_on_hangup())
        prev = reader.read()  # NoServerError before anything touches the terminal
        if prev.kernel_path:
            stack.enter_context(stats.bpf_stats())
        if once:
            time.sleep(REFRESH_SECONDS)
            cur = reader.read()
            console.print(render(cur, stats.rates(prev, cur)))
            return 0
        fd = stack.enter_context(_cbreak(sys.stdin))
        live = stack.enter_context(Live(render(prev, None), console=console, auto_refresh=False,
                                        screen=False, transient=False))
        live.refresh()
        shown = 0
        tick = time.monotonic()
        try:
            while frames is None or shown < frames:
                # one frame a second however long a read takes (a full conn_track: ~0.5 s)
                tick = max(tick + REFRESH_SECONDS, time.monotonic())
                if _wait_for_quit(fd, tick - time.monotonic()):
                    break
                cur = reader.read()
                live.update(render(cur, stats.rates(prev, cur)), refresh=True)
                prev = cur
                shown += 1
        except KeyboardInterrupt:
            pass
    return 0


def print_stats(port: int, *, console: Console | None = None) -> int:
    """`fsctl stats` without --json: one frame of totals (no rates). NoServerError if none runs."""
    snap = stats.read_snapshot(port)
    (console or Console()).print(render(snap, None))
    return 0
