"""Counters -> snapshots -> JSON: user-space counters shared across processes, the access log
format, and snapshots read from the real BPF object's maps pinned as a running server pins them."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import time
from pathlib import Path

import pytest

from fileserver_ctl import access_log, stats
from fileserver_ctl.stats import NoServerError
from fileserver_ctl.userstats import LATENCY_BUCKETS, STATUS_CLASSES, UserStats, stats_path

PORT = 18933

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


def test_event_entry_from_a_decoded_kernel_event():
    event = {"type": 2, "ts_ns": 5_000_000_000, "family": 6, "client_port": 0,
             "client_addr": [0, 0, int.from_bytes(b"\0\0\xff\xff", "little"),
                             int.from_bytes(bytes([192, 0, 2, 7]), "little")],
             "key": {"path": b"/index.html" + bytes(245)}, "method": 2, "http_minor": 0,
             "status": 304, "body_bytes": 0}
    entry = access_log.event_entry(event, mono_to_wall=100.0)
    assert entry == dict(remote="192.0.2.7", when=105.0, request=b"HEAD /index.html HTTP/1.0", status=304,
                         body_bytes=0, served_by="kernel")
