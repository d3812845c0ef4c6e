"""`fsctl top`: the pure render checked as exact text in an 80x24 capture console, and run_top
driven against a live user-stats file (no terminal needed); one test runs top on real pinned maps."""

from __future__ import annotations

import io
import os
import signal
import threading

import pytest
from rich.console import Console

from fileserver_ctl import stats, tui
from fileserver_ctl.policy import ClientFigures
from fileserver_ctl.stats import FileHits, NoServerError, ProgramStats, Snapshot
from fileserver_ctl.userstats import UserStats, UserTotals
from test_stats import _seed, pinned_server  # noqa: F401  (fixture)

PORT = 18731  # nothing of ours runs here; each test creates what it reads


def snapshot(**over: object) -> Snapshot:
    fields: dict[str, object] = dict(
        port=8080, monotonic=100.0, uptime=3723.0, kernel_path=True,
        counters={"responses": 12345, "response_bytes": 13_579_500, "not_modified": 45,
                  "xdp_drop_deny": 1500, "xdp_drop_syn_rate": 7},
        kernel_responses=12345, kernel_bytes=13_579_500,
        kernel_by_class=(("2xx", 12300), ("3xx", 45), ("4xx", 0), ("5xx", 0)),
        handed_off=20,
        user=UserTotals(requests=1234, bytes=5_000_000,
                        by_class=(("2xx", 1200), ("3xx", 0), ("4xx", 34), ("5xx", 0))),
        cached_files=12, cached_bytes=48_200,
        connections={"open": 2, "fin_sent": 1, "handed_off": 4},
        top_files=(FileHits("/index.html", 9000, 1024), FileHits("/style.css", 2000, 900),
                   FileHits("/assets/a-very-long-directory-name/logo.svg", 1000, 700),
                   FileHits("/demo.html", 300, 10), FileHits("/static.html", 45, 10),
                   FileHits("/sixth.html", 1, 10)),
        top_clients=(ClientFigures("127.0.0.1", 12, 3400, 2_345_678, 0, last_seen=0.4, first_seen=90.0),
                     ClientFigures("2001:db8:ffff:ffff:ffff:ffff:ffff:1", 30, 9, 1234, 17,
                                   last_seen=75.0, first_seen=300.0)),
        programs=(ProgramStats(9, "fileserver_ctime_set", 12, 12 * 800, "tracing"),
                  ProgramStats(10, "fileserver_ctime_skip", 0, 0, "tracing"),
                  ProgramStats(11, "fileserver_ctime_xchg", 3, 3 * 900, "tracing"),
                  ProgramStats(7, "fileserver_ingress", 50_000, 50_000 * 210, "sched_cls"),
                  ProgramStats(8, "fileserver_xdp", 60_000, 60_000 * 35, "xdp")),
    )
    fields.update(over)
    return Snapshot(**fields)  # type: ignore[arg-type]


def one_second_before(cur: Snapshot) -> Snapshot:
    """The same server one second earlier: 1,234 kernel and 34 user responses ago."""
    return snapshot(monotonic=cur.monotonic - 1, uptime=cur.uptime - 1, kernel_responses=11111,
                    kernel_bytes=11111 * 1100, user=UserTotals(requests=1200, bytes=4_900_000),
                    programs=(ProgramStats(7, "fileserver_ingress", 48_000, 48_000 * 200, "sched_cls"),))


def screen(renderable: object) -> list[str]:
    console = Console(file=io.StringIO(), width=80, height=24, record=True, color_system=None)
    console.print(renderable)
    return [line.rstrip() for line in console.export_text().splitlines()]


EXPECTED_FRAME = """\
fileserver :8080   up 01:02:03   kernel path on   q or Ctrl-C quits
Requests     req/s    bytes/s   responses      bytes
────────────────────────────────────────────────────
kernel     1,234.0    1.3 MiB      12,345   13.0 MiB
user          34.0   97.7 KiB       1,234    4.8 MiB
hit rate 97.3 %   cached 12 files, 47.1 KiB
connections owned 3, handed off 4 (20 since start)
XDP dropped deny 1,500, syn_rate 7
Top files                   hits   BPF program    runs/s   avg ns     runs
────────────────────────────────   ───────────────────────────────────────
/index.html                9,000   ctime_set           -    800.0       12
/style.css                 2,000   ctime_skip          -        -        0
…directory-name/logo.svg   1,000   ctime_xchg          -    900.0        3
/demo.html                   300   ingress       2,000.0    450.0   50,000
/static.html                  45   xdp                 -     35.0   60,000
Top clients                 conns   requests   bytes in   dropped    seen
─────────────────────────────────────────────────────────────────────────
127.0.0.1                      12      3,400    2.2 MiB         0   0.4 s
…ff:ffff:ffff:ffff:ffff:1      30          9    1.2 KiB        17   1 min"""


def test_frame_is_exact_and_fits_80x24():
    cur = snapshot()
    lines = screen(tui.render(cur, stats.rates(one_second_before(cur), cur)))
    assert "\n".join(lines) == EXPECTED_FRAME
    assert len(lines) <= tui.FRAME_LINES and max(map(len, lines)) <= 80


def test_a_full_frame_fits_80x24():
    """TOP_N files and clients, five programs, every figure 11 digits wide: still 80x23, with
    counts shortened (100.0 G) and long names elided at the front rather than cells cut by rich."""
    n, wide = stats.TOP_N, 10**11 - 1
    snap = snapshot(
        top_files=tuple(FileHits(f"/deep/directory/tree/file-{i}.html", wide, 1) for i in range(n)),
        top_clients=tuple(ClientFigures(f"2001:db8:ffff:ffff:ffff:ffff:ffff:{i}", wide, wide, 1023 * 1024**4,
                                        wide, last_seen=299.0, first_seen=300.0) for i in range(n)),
        programs=tuple(ProgramStats(p.id, p.name, wide, wide * 1000, p.type) for p in snapshot().programs))
    lines = screen(tui.render(snap, stats.rates(one_second_before(snap), snap)))
    assert len(lines) <= tui.FRAME_LINES and max(map(len, lines)) <= 80
    assert lines[0].startswith("fileserver :8080")
    assert lines[-1].split() == ["…ff:ffff:ffff:ffff:ffff:4", "100.0", "G", "100.0", "G", "1,023.0", "TiB",
                                 "100.0", "G", "4", "min"]
    (programs_row,) = [line for line in lines if " ctime_set " in line]
    assert programs_row.split()[-5:] == ["ctime_set", "-", "1,000.0", "100.0", "G"]


@pytest.mark.parametrize("value, text", [
    (0, "0"), (999_999, "999,999"), (1_000_000, "1.0 M"), (1_234_567, "1.2 M"), (999_949_999, "999.9 M"),
    (999_950_000, "1.0 G"), (10**12, "1.0 T"), (10**16, "10.0 P")])
def test_fmt_short(value, text):
    assert tui.fmt_short(value) == text


@pytest.mark.parametrize("seconds, text", [(0.04, "0.0 s"), (9.94, "9.9 s"), (12.4, "12 s"), (60, "1 min"),
                                           (299, "4 min"), (7200, "2 h")])
def test_fmt_ago(seconds, text):
    assert tui.fmt_ago(seconds) == text


def test_figures_follow_the_snapshot():
    """Rates are deltas over the interval: (12345-11111)/1 s kernel, (1234-1200)/1 s user; the
    hit rate is the kernel's share of them; ingress averaged (10.5M-9.6M ns)/2000 runs = 450 ns."""
    cur = snapshot()
    r = stats.rates(one_second_before(cur), cur)
    assert (r.kernel_rps, r.user_rps) == (1234.0, 34.0)
    assert r.hit_rate == pytest.approx(1234 / 1268)
    assert r.programs == {7: (2000.0, 450.0)}  # xdp appeared in between: no interval yet


def test_first_frame_has_no_rates_and_uses_totals():
    lines = screen(tui.render(snapshot(), None))
    rows = [line.split() for line in lines]
    assert ["kernel", "-", "-", "12,345", "13.0", "MiB"] in rows
    # cumulative share of all responses: 12345 / (12345 + 1234)
    assert "hit rate 90.9 %   cached 12 files, 47.1 KiB" in lines
    # without an interval the average run time is the cumulative one
    assert ["/demo.html", "300", "ingress", "-", "210.0", "50,000"] in rows


def test_without_kernel_path_says_so_and_shows_no_programs():
    snap = snapshot(kernel_path=False, counters={}, kernel_responses=0, kernel_bytes=0, handed_off=0,
                    cached_files=0, cached_bytes=0, connections={}, top_files=(), top_clients=(),
                    programs=())
    lines = screen(tui.render(snap, None))
    assert lines[0] == "fileserver :8080   up 01:02:03   kernel path off (-n)   q or Ctrl-C quits"
    assert not any("BPF program" in line or "Top clients" in line or "connections" in line
                   for line in lines)
    assert "hit rate 0.0 %   cached 0 files, 0 B" in lines


@pytest.mark.parametrize("value, text", [
    (0, "0 B"), (1023, "1,023 B"), (1024, "1.0 KiB"), (5 * 1024 ** 3, "5.0 GiB"), (None, "-")])
def test_fmt_bytes(value, text):
    assert tui.fmt_bytes(value) == text


@pytest.mark.parametrize("seconds, text", [(0, "00:00:00"), (59.9, "00:00:59"), (3723, "01:02:03"),
                                           (2 * 86400 + 5, "2d 00:00:05"), (-3, "00:00:00")])
def test_fmt_duration(seconds, text):
    assert tui.fmt_duration(seconds) == text


def test_counters_that_went_backwards_give_zero_rates():
    """A server restarted between two frames must not show negative rates."""
    cur = snapshot(kernel_responses=10)
    r = stats.rates(snapshot(monotonic=99.0), cur)
    assert r.kernel_rps == 0.0


# --- run_top against a server that exists only as its user-stats file -----------------------

@pytest.fixture
def user_only_server():
    """What a server started with -n leaves for readers: a user-stats file naming a live pid."""
    if not os.access("/run", os.W_OK):
        pytest.skip("needs write access to /run (run as root)")
    with UserStats.create(PORT, 2) as us:
        us.slot(0).record(200, 1000, 0.001)
        us.slot(1).record(404, 150, 0.002)
        yield us


def test_run_top_without_server_says_so():
    with pytest.raises(NoServerError, match=f"^no file server running on port {PORT}$"):
        tui.run_top(PORT, once=True, console=Console(file=io.StringIO()))


def test_run_top_once_prints_one_frame(user_only_server):
    out = io.StringIO()
    assert tui.run_top(PORT, once=True, console=Console(file=out, width=80, color_system=None)) == 0
    text = out.getvalue()
    assert text.startswith(f"fileserver :{PORT}   up 00:00:0")
    assert "kernel path off (-n)" in text
    assert text.count("Requests") == 1
    # two responses since start, none during the one-second interval
    assert [l.split() for l in text.splitlines() if l.startswith("user ")] == [["user", "0.0", "0", "B", "2", "1.1", "KiB"]]


def test_run_top_refreshes_until_frames_are_shown(user_only_server):
    out = io.StringIO()
    console = Console(file=out, width=80, color_system=None, force_terminal=False)
    assert tui.run_top(PORT, console=console, frames=2) == 0
    assert "q or Ctrl-C quits" in out.getvalue()


def test_run_top_stops_plainly_when_the_server_goes_away(user_only_server):
    # the creating process removes the file, as a stopping server does, after the first frame
    stop = threading.Timer(0.3, user_only_server.close)
    stop.start()
    try:
        with pytest.raises(NoServerError, match=f"^no file server running on port {PORT}$"):
            tui.run_top(PORT, console=Console(file=io.StringIO()), frames=3)
    finally:
        stop.cancel()


def test_print_stats_shows_totals(user_only_server):
    out = io.StringIO()
    assert tui.print_stats(PORT, console=Console(file=out, width=80, color_system=None)) == 0
    rows = [line.split() for line in out.getvalue().splitlines()]
    assert ["user", "-", "-", "2", "1.1", "KiB"] in rows


@pytest.mark.bpf
def test_top_restores_bpf_stats_when_its_terminal_goes_away(pinned_server):
    """Closing the terminal (SIGHUP) must leave kernel.bpf_stats_enabled as it was found."""
    import subprocess
    import sys
    import time

    port, _ = pinned_server
    sysctl = stats.BPF_STATS_SYSCTL
    before = sysctl.read_text().strip()
    if before != "0":
        pytest.skip("kernel.bpf_stats_enabled is already on: nothing to restore")
    with UserStats.create(port, 1):  # this process stands for the server
        top = subprocess.Popen([sys.executable, "-c", f"from fileserver_ctl import tui; tui.run_top({port})"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while sysctl.read_text().strip() != "1" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sysctl.read_text().strip() == "1", "top did not turn bpf stats on"
            top.send_signal(signal.SIGHUP)
            assert top.wait(timeout=10) == 0
        finally:
            if top.poll() is None:
                top.kill()
                top.wait(timeout=10)
    assert sysctl.read_text().strip() == before


@pytest.mark.bpf
def test_a_frame_of_the_real_object_fits_80x24(pinned_server):
    """Every program of the real object (a new one adds a row) with seeded files and clients."""
    from fileserver_ctl import config
    from fileserver_ctl.libbpf import Abi

    if not os.access("/run", os.W_OK):
        pytest.skip("needs write access to /run (run as root)")
    port, obj = pinned_server
    _seed(obj, Abi(config.ABI_HEADER))
    with UserStats.create(port, 1):
        snap = stats.read_snapshot(port)
    assert len(snap.programs) == len(obj.programs()) and snap.top_clients and snap.top_files
    lines = screen(tui.render(snap, stats.rates(snap, snap)))
    assert len(lines) <= tui.FRAME_LINES and max(map(len, lines)) <= 80, "\n".join(lines)
    assert lines[0].startswith(f"fileserver :{port}")
    assert "198.51.100.7" in "\n".join(lines)
