"""Prometheus `/metrics` for `fsctl up --metrics HOST:PORT`: one snapshot read per scrape.

Every label has a small fixed set of values (path, status class, state, counter name, reason,
program), so a scrape's size does not grow with traffic; clients are never a label. Counter
names and reasons come from `enum fs_stat` through the snapshot, never from a list here.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from . import stats
from .userstats import LATENCY_BUCKETS

EXAMPLE_ADDR = "127.0.0.1:9113"


class MetricsAddressError(ValueError):
    """--metrics got something that is not HOST:PORT; str() is the one line a user sees."""


def parse_addr(addr: str) -> tuple[str, int]:
    """"HOST:PORT", "[v6]:PORT" or ":PORT" (every IPv4 address) -> (host, port), checked."""
    host, sep, port_text = addr.strip().rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise MetricsAddressError(f"invalid metrics address {addr!r}: expected HOST:PORT, e.g. {EXAMPLE_ADDR}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "0.0.0.0"
    port = int(port_text)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError):
        raise MetricsAddressError(f"invalid metrics address {addr!r}: unknown host {host!r}") from None
    return host, port


class FileserverCollector(Collector):
    """Reads the server's snapshot on each scrape and turns it into metric families."""

    def __init__(self, port: int, reader: stats.StatsReader | None = None) -> None:
        self.port = port
        self._reader = reader or stats.StatsReader(port)
        self._lock = threading.Lock()  # the HTTP server answers scrapes from several threads

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("fileserver_up", "1 while the file server on this port runs")
        try:
            with self._lock:
                snap = self._reader.read()
        except stats.NoServerError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families(snap)


def families(snap: stats.Snapshot) -> Iterator[Any]:
    """Metric families of one snapshot (pure: tested without a server)."""
    requests = CounterMetricFamily("fileserver_requests", "Responses sent, by the path that served them "
                                   "and status class", labels=["path", "code"])
    for code, n in snap.kernel_by_class:
        requests.add_metric(["kernel", code], n)
    for code, n in snap.user.by_class:
        requests.add_metric(["user", code], n)
    yield requests

    sent = CounterMetricFamily("fileserver_response_bytes", "Response bytes sent, by path", labels=["path"])
    sent.add_metric(["kernel"], snap.kernel_bytes)
    sent.add_metric(["user"], snap.user.bytes)
    yield sent

    yield GaugeMetricFamily("fileserver_cache_entries", "Files held in the kernel cache", value=snap.cached_files)
    yield GaugeMetricFamily("fileserver_cache_bytes", "Response bytes held in the kernel cache",
                            value=snap.cached_bytes)

    conns = GaugeMetricFamily("fileserver_connections", "Connections tracked by the kernel path, by state "
                              "(enum fs_conn_state)", labels=["state"])
    for state, n in snap.connections.items():
        conns.add_metric([state], n)
    yield conns
    if snap.kernel_path:
        handoffs = CounterMetricFamily("fileserver_handoffs", "Connections the kernel path handed to the "
                                       "kernel's TCP stack, by reason (FS_STAT_HANDOFF_*)", labels=["reason"])
        for reason, n in stats.handoffs_by_reason(snap.counters).items():
            handoffs.add_metric([reason], n)
        yield handoffs
        yield CounterMetricFamily("fileserver_handoff_failures", "Hand-offs that failed (no listener, or the "
                                  "kernel refused): the segment was dropped",
                                  value=snap.counters.get(stats.HANDOFF_FAILED, 0))
        drops = CounterMetricFamily("fileserver_xdp_drops", "Packets to the server port the XDP policy "
                                    "dropped, by reason (FS_STAT_XDP_DROP_*)", labels=["reason"])
        for reason, n in stats.xdp_drops(snap.counters).items():
            drops.add_metric([reason], n)
        yield drops

    cumulative, buckets = 0, []
    for le, n in zip((*map(str, LATENCY_BUCKETS), "+Inf"), snap.user.latency_counts):
        cumulative += n
        buckets.append((le, cumulative))
    yield HistogramMetricFamily("fileserver_user_request_duration_seconds",
                                "Time the user-space server took per response", buckets=buckets,
                                sum_value=snap.user.latency_sum)

    events = CounterMetricFamily("fileserver_kernel_events", "Counters of the kernel path (enum fs_stat)",
                                 labels=["name"])
    for name, n in snap.counters.items():
        events.add_metric([name], n)
    yield events

    if snap.programs:
        runs = CounterMetricFamily("fileserver_bpf_program_runs", "BPF program runs (counted only while "
                                   "kernel.bpf_stats_enabled is on)", labels=["program"])
        spent = CounterMetricFamily("fileserver_bpf_program_run_seconds", "Time spent in BPF programs "
                                    "(counted only while kernel.bpf_stats_enabled is on)", labels=["program"])
        for p in snap.programs:
            runs.add_metric([p.name], p.run_cnt)
            spent.add_metric([p.name], p.run_time_ns / 1e9)
        yield runs
        yield spent

    yield GaugeMetricFamily("fileserver_uptime_seconds", "Seconds since the server started", value=snap.uptime)


@dataclass
class MetricsServer:
    """The running /metrics endpoint; close() stops it."""

    host: str
    port: int
    _httpd: Any
    _thread: threading.Thread

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics(addr: str, port: int, *, reader: stats.StatsReader | None = None) -> MetricsServer:
    """Serve /metrics for the file server on `port` at `addr` ("HOST:PORT") from a daemon thread.

    Raises MetricsAddressError for a malformed address and OSError (its message names the
    address) when it cannot be bound, e.g. EADDRINUSE.
    """
    host, mport = parse_addr(addr)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FileserverCollector(port, reader))
    try:
        httpd, thread = start_http_server(mport, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {addr}: {exc.strerror}") from None
    return MetricsServer(host, httpd.server_address[1], httpd, thread)
