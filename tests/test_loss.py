"""1,000 requests through a lossy link: 2% of packets dropped in the client's namespace, both ways.

This kernel has no netem: `iptables -m statistic --mode random --probability 0.02 -j DROP` on
INPUT and OUTPUT inside the namespace drops what the server sends and what the clients send.
Segmentation offloads are off on both ends, so a dropped packet is one segment (veth would
otherwise carry a 64 KiB TSO skb as one packet). Every request (cached files the kernel answers, cached files too large for one segment, files
user space serves; keep-alive and Connection: close; IPv4 and IPv6) must complete with the
file's exact bytes. Every socket has a timeout and the client run is bounded as a whole.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from test_veth import FILES, Link, check_bytes, delta, fsctl_up, lossy_link

pytestmark = [pytest.mark.bpf, pytest.mark.slow]

LOSS = "0.02"
REQUESTS = 1000
KERNEL = ["/small.txt", "/k1.bin", "/k1100.bin"]  # one segment
MULTI = ["/k1400.bin", "/k10.bin", "/k100.bin"]  # several segments, sent and resent by the kernel
USER = ["/k300.bin"]  # over the cache's per-file limit: handed off


def workload(rng: random.Random) -> list[tuple[int, list[tuple[str, bool]]]]:
    """(family, requests) sessions adding up to REQUESTS requests."""
    sessions: list[list[tuple[str, bool]]] = []
    for _ in range(60):  # keep-alive, every answer from the kernel
        sessions.append([(rng.choice(KERNEL), False) for _ in range(5)])
    for _ in range(20):  # keep-alive, hits, then a hand-off mid-connection
        sessions.append([(rng.choice(KERNEL), False), (rng.choice(MULTI), False), (USER[0], False),
                         (rng.choice(KERNEL), False), (rng.choice(KERNEL + MULTI), False)])
    for _ in range(20):  # keep-alive from user space from the first request
        sessions.append([(USER[0], False)] + [(rng.choice(KERNEL + MULTI), False) for _ in range(4)])
    singles = [KERNEL] * 300 + [MULTI] * 100 + [USER] * 100  # Connection: close
    sessions += [[(rng.choice(choices), True)] for choices in singles]
    rng.shuffle(sessions)
    assert sum(len(s) for s in sessions) == REQUESTS
    return [(4 if i % 2 else 6, s) for i, s in enumerate(sessions)]


@pytest.fixture
def lossy(real_bpf_object: Path):
    with lossy_link(LOSS) as lk:
        yield lk


@pytest.mark.timeout(180)
def test_thousand_requests_with_two_percent_loss(lossy: Link, tmp_path: Path) -> None:
    for name, data in FILES.items():
        (tmp_path / name).write_bytes(data)
    plan = workload(random.Random(9))
    started = time.monotonic()
    with fsctl_up(lossy, tmp_path) as srv:
        before = srv.counters()
        results: list[list[dict]] = []
        for family in (4, 6):
            sessions = [s for f, s in plan if f == family]
            results += lossy.sessions(family, srv.port, sessions, workers=8, timeout=15, run_timeout=75)
        moved = delta(before, srv.counters())
    sessions = [s for f, s in plan if f == 4] + [s for f, s in plan if f == 6]
    check_bytes(results, sessions)
    elapsed = time.monotonic() - started
    dropped = lossy.pair.run_in(["iptables", "-L", "-v", "-x", "-n"], capture_output=True, text=True).stdout

    slowest = max(r["seconds"] for s in results for r in s)
    print(f"{REQUESTS} requests in {elapsed:.1f} s, slowest {slowest:.2f} s; counters moved: {moved}\n{dropped}")
    # the loss was real, and each path had its share of it
    assert sum(int(line.split()[0]) for line in dropped.splitlines() if "DROP" in line and "statistic" in line) > 0
    assert moved.get("responses", 0) >= 300  # the kernel answered its share ...
    assert moved.get("multi_segment", 0) > 0  # ... long answers included ...
    assert moved.get("handoff_miss", 0) > 0  # ... and handed off what it does not hold
    assert moved.get("handoff_failed", 0) == 0
