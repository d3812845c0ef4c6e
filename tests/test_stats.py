"""Counters -> snapshots -> JSON: user-space counters shared across processes, the access log
format, and snapshots read from the real BPF object's maps pinned as a running server pins them."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from fileserver_ctl import access_log, stats
from fileserver_ctl.stats import NoServerError
from fileserver_ctl.userstats import LATENCY_BUCKETS, UserStats, stats_path

PORT = 18733

needs_run = pytest.mark.skipif(not os.access("/run", os.W_OK), reason="needs write access to /run (run as root)")


# --- userstats: one slot per worker, read from other processes --------------------------------

RECORDS_PER_WORKER = 500


def _forked_worker(us: UserStats, index: int) -> None:
    rec = us.slot(index)
    for n in range(RECORDS_PER_WORKER):
        rec.record((200, 304, 404, 503)[n % 4], 100, 0.002)


def _spawned_worker(port: int, index: int) -> None:
    us = UserStats.open(port, writable=True)
    rec = us.slot(index)
    for _ in range(RECORDS_PER_WORKER):
        rec.record(200, 10, 0.0001)
    us.close()


def _spawned_reader(port: int, queue: multiprocessing.Queue) -> None:
    us = UserStats.open(port)
    queue.put((us.totals(), us.alive(), us.workers))
    us.close()


@needs_run
def test_userstats_add_up_across_worker_processes():
    with UserStats.create(PORT, 3) as us:
        fork = multiprocessing.get_context("fork")
        spawn = multiprocessing.get_context("spawn")
        procs = [fork.Process(target=_forked_worker, args=(us, i)) for i in (0, 1)]
        procs.append(spawn.Process(target=_spawned_worker, args=(PORT, 2)))
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        assert stats_path(PORT).exists(), "a worker exiting must not remove the parent's file"

        queue = spawn.Queue()
        reader = spawn.Process(target=_spawned_reader, args=(PORT, queue))
        reader.start()
        totals, alive, workers = queue.get(timeout=30)
        reader.join(timeout=30)

    assert (alive, workers) == (True, 3)
    assert totals.requests == 3 * RECORDS_PER_WORKER
    assert totals.bytes == 2 * RECORDS_PER_WORKER * 100 + RECORDS_PER_WORKER * 10
    per_class = RECORDS_PER_WORKER // 4 * 2
    assert dict(totals.by_class) == {"2xx": per_class + RECORDS_PER_WORKER, "3xx": per_class,
                                     "4xx": per_class, "5xx": per_class}
    counts = dict(zip((*LATENCY_BUCKETS, "+Inf"), totals.latency_counts))
    assert counts[0.0005] == RECORDS_PER_WORKER and counts[0.0025] == 2 * RECORDS_PER_WORKER
    assert sum(totals.latency_counts) == totals.requests
    assert totals.latency_sum == pytest.approx(2 * RECORDS_PER_WORKER * 0.002 + RECORDS_PER_WORKER * 0.0001)
    assert not stats_path(PORT).exists(), "the creating process removes the file on close"


@needs_run
def test_userstats_slots_are_bounded_and_readers_read_only():
    with UserStats.create(PORT, 2) as us:
        with pytest.raises(IndexError):
            us.slot(2)
        ro = UserStats.open(PORT)
        try:
            with pytest.raises(PermissionError):
                ro.slot(0)
        finally:
            ro.close()


@needs_run
def test_status_outside_2xx_5xx_counts_as_request_only():
    with UserStats.create(PORT, 1) as us:
        us.slot(0).record(101, -5, -1.0)
        t = us.totals()
    assert (t.requests, t.bytes, t.latency_sum) == (1, 0, 0.0)
    assert all(n == 0 for _, n in t.by_class)
    assert t.latency_counts[0] == 1


def _create_and_die(port: int) -> None:
    us = UserStats.create(port, 1)
    us.slot(0).record(200, 1, 0.001)
    os._exit(0)  # like SIGKILL: no close(), the file stays behind


@needs_run
def test_a_crashed_server_is_not_running():
    p = multiprocessing.get_context("fork").Process(target=_create_and_die, args=(PORT,))
    p.start()
    p.join(timeout=30)
    try:
        assert stats_path(PORT).exists()
        with pytest.raises(NoServerError, match=f"^no file server running on port {PORT}$"):
            stats.read_snapshot(PORT)
    finally:
        stats_path(PORT).unlink(missing_ok=True)


def test_no_server_at_all():
    with pytest.raises(NoServerError, match=f"^no file server running on port {PORT}$"):
        stats.stats_json(PORT)


@needs_run
def test_json_of_a_server_without_kernel_path():
    with UserStats.create(PORT, 1) as us:
        us.slot(0).record(200, 512, 0.001)
        doc = json.loads(stats.stats_json(PORT))
    assert doc["kernel_path"] is False
    assert (doc["kernel_responses"], doc["user_responses"], doc["user_bytes"]) == (0, 1, 512)
    assert (doc["cached_files"], doc["cached_bytes"]) == (0, 0)
    assert doc["responses_by_class"]["user"] == {"2xx": 1, "3xx": 0, "4xx": 0, "5xx": 0}
    assert 0 <= doc["uptime_seconds"] < 60


# --- access log: nginx's combined format plus the serving path --------------------------------

COMBINED = re.compile(r'^(\S+) - - \[(\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4})\] "(.*)" (\d{3}) (\d+) '
                      r'"(.*)" "(.*)" "(kernel|user)"$')


def test_format_entry_is_combined_log_format(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        line = access_log.format_entry(remote="127.0.0.1", when=784111777.0, request="GET /index.html HTTP/1.1",
                                       status=200, body_bytes=1024, user_agent="curl/8.0", served_by="kernel")
    finally:
        monkeypatch.undo()
        time.tzset()
    assert line == ('127.0.0.1 - - [06/Nov/1994:08:49:37 +0000] "GET /index.html HTTP/1.1" 200 1024 '
                    '"-" "curl/8.0" "kernel"')


def test_format_entry_escapes_like_nginx():
    """Quotes, backslashes, control and non-ASCII bytes become \\xHH: a request can't forge a field."""
    line = access_log.format_entry(remote="::1", when=0, request=b'GET /a"b\\c\n\xff HTTP/1.1', status=400,
                                   body_bytes=0, referer='x" "y', user_agent="é")
    m = COMBINED.match(line)
    assert m, line
    assert m.group(3) == r"GET /a\x22b\x5Cc\x0A\xFF HTTP/1.1"
    assert m.group(6) == r"x\x22 \x22y" and m.group(7) == r"\xC3\xA9" and m.group(8) == "user"


def test_access_log_lines_from_many_processes_stay_whole(tmp_path: Path):
    path = tmp_path / "access.log"

    def writer(tag: str) -> None:
        with access_log.AccessLog(path) as log:
            for n in range(200):
                log.log(remote="10.0.0.1", when=0, request=f"GET /{tag}/{n} HTTP/1.1", status=200,
                        body_bytes=n, served_by="user")
        os._exit(0)

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=writer, args=(t,)) for t in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
    lines = path.read_text().splitlines()
    assert len(lines) == 400 and all(COMBINED.match(line) for line in lines)


def test_buffered_access_log_writes_whole_batches(tmp_path: Path):
    path = tmp_path / "access.log"
    entry = dict(remote="10.0.0.1", when=0, request="GET / HTTP/1.1", status=200, body_bytes=5)
    with access_log.AccessLog(path, buffer_lines=3) as log:
        for _ in range(3):
            log.log(**entry)
        assert path.read_text() == ""
        log.log(**entry)
        assert len(path.read_text().splitlines()) == 4
        log.log(**entry)
        log.flush()
        assert len(path.read_text().splitlines()) == 5
        log.log(**entry)
    assert len(path.read_text().splitlines()) == 6  # close() flushes


def test_a_failing_log_write_drops_lines_and_goes_on():
    with access_log.AccessLog("/dev/full") as log:
        log.log(remote="10.0.0.1", when=0, request="GET / HTTP/1.1", status=200, body_bytes=5)
    assert log.dropped == 1


def test_event_entry_from_a_decoded_kernel_event():
    raw = socket.inet_pton(socket.AF_INET6, "2001:db8::7")
    event = {"type": 2, "ts_ns": 5_000_000_000, "family": 6, "client_port": 0,
             "client_addr": [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, 16, 4)],
             "key": {"path": b"/index.html" + bytes(245)}, "method": 2, "http_minor": 0,
             "status": 304, "body_bytes": 0}
    entry = access_log.event_entry(event, mono_to_wall=100.0)
    assert entry == dict(remote="2001:db8::7", when=105.0, request=b"HEAD /index.html HTTP/1.0", status=304,
                         body_bytes=0, served_by="kernel")


# --- snapshots from the real object's maps, pinned where a running server pins them -----------

XDP_PACKET = bytes(12) + b"\x08\x00" + bytes(50)


@pytest.fixture
def pinned_server(real_bpf_object: Path, bpffs: Path, free_port: int):
    """The real fileserver.bpf.o loaded and its maps pinned under pin_dir(port), as KernelPath
    does: every map but the internal (dotted) ones. Nothing is attached: the programs run
    through BPF_PROG_TEST_RUN only."""
    from fileserver_ctl import config
    from fileserver_ctl.libbpf import BpfObject

    pins = config.pin_dir(free_port)
    with BpfObject.open(real_bpf_object) as obj:
        obj.load()
        pins.mkdir(parents=True)
        try:
            for name, m in obj.maps().items():
                if "." not in name:
                    m.pin(pins / name)
            yield free_port, obj
        finally:
            for pin in pins.iterdir():
                pin.unlink()
            pins.rmdir()


def _u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def _addr_words(raw: bytes) -> list[int]:
    raw = raw.ljust(16, b"\0")
    return [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]


def _seed(obj, abi) -> None:
    """Kernel-side state a busy server would have: per-CPU counters, cached files, connections,
    and XDP's per-client figures (other addresses than conn_track's: top clients come from there)."""
    ncpu = len(obj.map("stats")[_u32(0)])
    names = stats.counter_names(abi)
    per_cpu = lambda total: [(total if cpu == 0 else 1).to_bytes(8, "little") for cpu in range(ncpu)]
    obj.map("stats")[_u32(names["responses"])] = per_cpu(100 - (ncpu - 1))  # sums to 100
    obj.map("stats")[_u32(names["response_bytes"])] = per_cpu(50_000 - (ncpu - 1))
    obj.map("stats")[_u32(names["not_modified"])] = per_cpu(10 - (ncpu - 1))
    obj.map("stats")[_u32(names["handoff_miss"])] = per_cpu(7 - (ncpu - 1))
    obj.map("stats")[_u32(names["handoff_failed"])] = per_cpu(5 - (ncpu - 1))

    for path, hits, size in [("/index.html", 60, 1024), ("/style.css", 30, 2000), ("/demo.html", 90, 10)]:
        key = abi.pack("struct fs_path_key", {"path": path.encode()})
        obj.map("file_cache")[key] = abi.pack("struct fs_entry", {"hits": hits, "body_len": size})

    state = abi.enum("fs_conn_state")
    now = time.monotonic_ns()
    idle = abi.const("FS_CONN_IDLE_NS")
    conns = [(b"\xc0\x00\x02\x01", 4, 40000, "FS_CONN_OPEN", now),
             (b"\xc0\x00\x02\x01", 4, 40001, "FS_CONN_HANDED_OFF", now),
             (socket.inet_pton(socket.AF_INET6, "2001:db8::5"), 6, 40002, "FS_CONN_FIN_SENT", now),
             (b"\xc0\x00\x02\x09", 4, 40003, "FS_CONN_OPEN", now - idle - 10**9)]  # expired
    for addr, family, port, st, seen in conns:
        key = abi.pack("struct fs_tuple", {"client_addr": _addr_words(addr), "client_port": socket.htons(port),
                                            "server_port": socket.htons(8080), "family": family})
        obj.map("conn_track")[key] = abi.pack("struct fs_conn", {"state": state[st], "last_seen_ns": seen})

    client_idle = abi.const("FS_CLIENT_IDLE_NS")
    clients = [  # address, family, connections, requests, bytes, dropped, seconds since last seen
        (b"\xc6\x33\x64\x07", 4, 3, 40, 9_000, 0, 2),
        (socket.inet_pton(socket.AF_INET6, "2001:db8::9"), 6, 5, 400, 70_000, 12, 1),
        (b"\xc6\x33\x64\x08", 4, 1, 40, 9_500, 0, 0),  # as many requests as .7: more bytes first
        (b"\xc6\x33\x64\x09", 4, 99, 999, 1, 0, client_idle // 10**9 + 1),  # idle: starts afresh
    ]
    for addr, family, conns_, requests, nbytes, dropped, ago in clients:
        key = abi.pack("struct fs_client_key", {"addr": addr, "family": family})
        obj.map("client_stats")[key] = abi.pack("struct fs_client", {
            "first_seen_ns": now - 60 * 10**9 - ago * 10**9, "last_seen_ns": now - ago * 10**9,
            "connections": conns_, "requests": requests, "bytes": nbytes, "dropped": dropped})


@pytest.mark.bpf
@needs_run
def test_snapshot_and_json_from_real_maps(pinned_server):
    from fileserver_ctl import config
    from fileserver_ctl.libbpf import Abi, prog_test_run

    port, obj = pinned_server
    abi = Abi(config.ABI_HEADER)
    _seed(obj, abi)
    with stats.bpf_stats() as enabled:
        # a counter moved by the program itself, and run counts while stats are on
        prog_test_run(obj.program("fileserver_xdp").fd, XDP_PACKET, repeat=3)
    assert enabled

    with UserStats.create(port, 2) as us:
        us.slot(0).record(200, 700, 0.001)
        us.slot(1).record(404, 100, 0.002)
        snap = stats.read_snapshot(port)
        doc = json.loads(json.dumps(stats.to_json(snap)))

    enum_names = [n.removeprefix("FS_STAT_").lower() for n in abi.enum("fs_stat") if n != "FS_STAT_MAX"]
    assert list(snap.counters) == enum_names  # named from the header, in enum order
    assert all(doc[name] == snap.counters[name] for name in enum_names)
    assert doc["xdp_packets"] == 3
    assert (doc["responses"], doc["kernel_responses"], doc["kernel_bytes"]) == (100, 100, 50_000)
    assert doc["responses_by_class"]["kernel"] == {"2xx": 90, "3xx": 10, "4xx": 0, "5xx": 0}
    assert doc["handed_off"] == 7  # hand-off reasons; a failed hand-off handed nothing
    reasons = [n.removeprefix("handoff_") for n in enum_names if n.startswith("handoff_") and n != "handoff_failed"]
    assert list(doc["handoffs_by_reason"]) == reasons and doc["handoffs_by_reason"]["miss"] == 7
    assert sum(doc["handoffs_by_reason"].values()) == doc["handed_off"]
    assert doc["xdp_drops"] == {n.removeprefix("xdp_drop_"): 0 for n in enum_names if n.startswith("xdp_drop_")}
    assert {"deny", "syn_rate"} <= set(doc["xdp_drops"])
    assert (doc["user_responses"], doc["user_bytes"]) == (2, 800)
    assert (doc["cached_files"], doc["cached_bytes"]) == (3, 3034)
    assert [(f["path"], f["hits"]) for f in doc["top_files"]] == [("/demo.html", 90), ("/index.html", 60),
                                                                 ("/style.css", 30)]
    assert doc["connections"] == {"open": 1, "fin_sent": 1, "handed_off": 1}
    assert doc["connections_owned"] == 2
    # busiest first (requests, then connections, then bytes), idle clients left out
    top = [(c["addr"], c["connections"], c["requests"], c["bytes"], c["dropped"]) for c in doc["top_clients"]]
    assert top == [("2001:db8::9", 5, 400, 70_000, 12), ("198.51.100.7", 3, 40, 9_000, 0),
                   ("198.51.100.8", 1, 40, 9_500, 0)]
    seen = {c["addr"]: (c["last_seen"], c["first_seen"]) for c in doc["top_clients"]}
    assert seen["198.51.100.7"][0] == pytest.approx(2, abs=1) and seen["198.51.100.7"][1] == pytest.approx(62, abs=1)
    assert doc["hit_rate"] == pytest.approx(100 / 102)

    # every program of the loaded object, whatever the object holds; none of another load
    progs = {p["name"]: p for p in doc["programs"]}
    assert set(progs) == {p.name for p in obj.programs()}
    assert {"fileserver_ingress", "fileserver_xdp"} <= set(progs)
    assert len(doc["programs"]) == len(obj.programs())  # a server on another port loads the same names
    assert (progs["fileserver_xdp"]["type"], progs["fileserver_ingress"]["type"]) == ("xdp", "sched_cls")
    assert progs["fileserver_xdp"]["run_cnt"] == 3 and progs["fileserver_xdp"]["run_time_ns"] > 0
    assert progs["fileserver_ingress"]["run_cnt"] == 0  # not run, not attached


@pytest.mark.bpf
@needs_run
def test_a_server_without_client_stats_has_no_top_clients(pinned_server):
    """An object from before the per-client figures pins no client_stats: an empty list, no error."""
    from fileserver_ctl import config

    port, _ = pinned_server
    (config.pin_dir(port) / "client_stats").unlink()
    with UserStats.create(port, 1):
        snap = stats.read_snapshot(port, programs=False)
    assert snap.kernel_path and snap.top_clients == ()
    assert stats.to_json(snap)["top_clients"] == []


@pytest.mark.bpf
@needs_run
def test_kernel_only_server_without_userstats_file(pinned_server):
    """Pinned maps and no user-stats file: alive while kernel.py's run-state names a live pid."""
    from fileserver_ctl.kernel import state_path

    port, obj = pinned_server
    with pytest.raises(NoServerError):  # pins without an owner: what a crash leaves
        stats.read_snapshot(port)
    state_path(port).parent.mkdir(parents=True, exist_ok=True)
    state_path(port).write_text(json.dumps({"pid": os.getpid()}))
    try:
        snap = stats.read_snapshot(port, programs=False)
    finally:
        state_path(port).unlink()
    assert snap.kernel_path and snap.user_responses == 0
    assert 0 <= snap.uptime < 60  # from the pins' age
    assert snap.programs == ()


@pytest.mark.bpf
@needs_run
def test_a_header_with_more_counters_than_the_running_map(pinned_server, tmp_path: Path):
    """A server loaded from an older object: its stats map has fewer entries than the header
    has counters. Only the map's counters are read, and they are right."""
    from fileserver_ctl import config
    from fileserver_ctl.libbpf import Abi

    port, obj = pinned_server
    _seed(obj, Abi(config.ABI_HEADER))
    header = tmp_path / "newer.h"
    text = config.ABI_HEADER.read_text()
    assert text.count("\tFS_STAT_MAX,") == 1
    header.write_text(text.replace("\tFS_STAT_MAX,", "\tFS_STAT_LATER_A,\n\tFS_STAT_LATER_B,\n\tFS_STAT_MAX,"))
    with UserStats.create(port, 1):
        snap = stats.read_snapshot(port, header=header, programs=False)
    assert obj.map("stats").max_entries == len(snap.counters) < len(stats.counter_names(Abi(header)))
    assert "later_a" not in snap.counters and snap.counters["responses"] == 100
    assert stats.to_json(snap)["handoffs_by_reason"]["miss"] == 7


@pytest.mark.parametrize("ctype, fields", [
    ("struct fs_tuple", ("client_addr", "family", "client_port")),
    ("struct fs_conn", ("state", "last_seen_ns")),
])
def test_field_reader_agrees_with_abi_unpack(ctype, fields):
    """The fast reader used on conn_track finds the same values as a full decode, at offsets taken
    from the header."""
    from fileserver_ctl import config
    from fileserver_ctl.libbpf import Abi

    abi = Abi(config.ABI_HEADER)
    data = bytes((i * 37 + 11) % 256 for i in range(abi.sizeof(ctype)))
    full = abi.unpack(ctype, data)
    reader = stats.FieldReader(abi, ctype, fields)
    for name in fields:
        want = full[name]
        if isinstance(want, list):
            want = b"".join(w.to_bytes(4, sys.byteorder) for w in want)
        assert reader.get(data, name) == want, name


def test_bpf_stats_is_restored():
    sysctl = stats.BPF_STATS_SYSCTL
    if not os.access(sysctl, os.W_OK):
        pytest.skip(f"needs write access to {sysctl} (run as root)")
    before = sysctl.read_text().strip()
    with stats.bpf_stats() as on:
        assert on and sysctl.read_text().strip() == "1"
    assert sysctl.read_text().strip() == before


# --- kernel responses from the `events` ring buffer into the access log ----------------------

# Reports, with the header's struct fs_event, one response (HEAD /index.html from 192.0.2.7 over
# HTTP/1.0, 304) and one hand-off.
EVENT_SOURCE = r"""
#include <linux/types.h>
/* fileserver.h carries its own struct bpf_timer (the ABI shared with Python), as the object does */
#define bpf_timer bpf_timer___uapi
#include <linux/bpf.h>
#undef bpf_timer
#include <bpf/bpf_helpers.h>
#include "fileserver.h"

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

SEC("xdp")
int report(struct xdp_md *ctx)
{
	struct fs_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e)
		return XDP_PASS;
	__builtin_memset(e, 0, sizeof(*e));
	e->type = FS_EVENT_RESPONSE;
	__builtin_memcpy(e->key.path, "/index.html", 11);
	e->ts_ns = bpf_ktime_get_ns();
	e->client_addr[0] = 0x070200c0;	/* 192.0.2.7 in network order on a little-endian host */
	e->client_port = 0x409c;
	e->status = 304;
	e->family = 4;
	e->method = 2;
	e->http_minor = 0;
	bpf_ringbuf_submit(e, 0);

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return XDP_PASS;
	__builtin_memset(e, 0, sizeof(*e));
	e->type = FS_EVENT_HANDOFF;
	bpf_ringbuf_submit(e, 0);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
"""


def test_event_consumer_needs_a_header_that_reports_responses(tmp_path: Path):
    from fileserver_ctl.libbpf import Abi

    header = tmp_path / "old.h"
    header.write_text("enum fs_event_type { FS_EVENT_HANDOFF = 1 };\n"
                      "struct fs_event { __u32 type; __u32 reason; };\n")
    with pytest.raises(LookupError, match="defines no FS_EVENT_RESPONSE"):
        access_log.KernelEventLog(lambda cb: None, Abi(header), None)


@pytest.mark.bpf
def test_kernel_responses_reach_the_access_log(tmp_path: Path):
    import subprocess

    from conftest import CLANG
    from fileserver_ctl.libbpf import Abi, BpfObject, RingBuffer, prog_test_run

    if CLANG is None:
        pytest.skip("clang-16 not installed")
    if sys.byteorder != "little":
        pytest.skip("the test program writes the address for a little-endian host")
    from fileserver_ctl import config

    (tmp_path / "event.bpf.c").write_text(EVENT_SOURCE)
    arch_include = f"/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run([CLANG, "-g", "-O2", "-target", "bpf", f"-I{arch_include}", f"-I{config.ABI_HEADER.parent}",
                    "-c", str(tmp_path / "event.bpf.c"), "-o", str(tmp_path / "event.bpf.o")],
                   check=True, timeout=60)
    log_path = tmp_path / "access.log"
    with BpfObject.open(tmp_path / "event.bpf.o") as obj, access_log.AccessLog(log_path) as log:
        obj.load()
        consumer = access_log.KernelEventLog(lambda cb: RingBuffer(obj.map("events"), cb),
                                             Abi(config.ABI_HEADER), log)
        before = time.time()
        prog_test_run(obj.program("report").fd, XDP_PACKET)
        consumer.poll(1000)
        assert (consumer.written, consumer.skipped) == (1, 1)
        # run() in a thread, as fsctl up does: a buffered log still reaches the file
        log.buffer_lines = 100
        stop = threading.Event()
        drain = threading.Thread(target=consumer.run, args=(stop,))
        drain.start()
        prog_test_run(obj.program("report").fd, XDP_PACKET)
        deadline = time.monotonic() + 5
        while len(log_path.read_text().splitlines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        drain.join(timeout=5)
    assert (consumer.written, consumer.skipped) == (2, 2)
    line = log_path.read_text().splitlines()[1]
    m = COMBINED.match(line)
    assert m, line
    assert m.group(1, 3, 4, 5, 8) == ("192.0.2.7", "HEAD /index.html HTTP/1.0", "304", "0", "kernel")
    logged = datetime.datetime.strptime(m.group(2), "%d/%b/%Y:%H:%M:%S %z").timestamp()
    assert before - 2 <= logged <= time.time() + 1  # monotonic clock turned into wall-clock time
