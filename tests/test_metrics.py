"""Prometheus /metrics: address checks, and scrapes parsed with prometheus_client.parser whose
totals must match the responses recorded."""

from __future__ import annotations

import os
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fileserver_ctl import metrics
from fileserver_ctl.metrics import MetricsAddressError, parse_addr, start_metrics
from fileserver_ctl.userstats import LATENCY_BUCKETS, UserStats
from test_stats import pinned_server  # noqa: F401  (fixture)

PORT = 18732


@pytest.mark.parametrize("addr, parsed", [
    ("127.0.0.1:9113", ("127.0.0.1", 9113)),
    ("[::1]:9113", ("::1", 9113)),
    (":9113", ("0.0.0.0", 9113)),
    ("localhost:80", ("localhost", 80)),
])
def test_parse_addr(addr, parsed):
    assert parse_addr(addr) == parsed


@pytest.mark.parametrize("addr", ["9113", "127.0.0.1", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000",
                                  "no-such-host.invalid:9113", "[::1:9113", ""])
def test_bad_addr_is_one_clear_error(addr):
    with pytest.raises(MetricsAddressError, match=r"^invalid metrics address .*(HOST:PORT|unknown host)"):
        start_metrics(addr, PORT)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted label items: value} for every sample of a /metrics page."""
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def user_only_server():
    if not os.access("/run", os.W_OK):
        pytest.skip("needs write access to /run (run as root)")
    with UserStats.create(PORT, 2) as us:
        yield us


def test_scrape_without_server_reports_down():
    endpoint = start_metrics("127.0.0.1:0", PORT)
    try:
        m = scrape(f"http://127.0.0.1:{endpoint.port}/metrics")
    finally:
        endpoint.close()
    assert m["fileserver_up"] == {(): 0.0}
    assert "fileserver_requests_total" not in m


def test_scrape_totals_match_what_was_recorded(user_only_server):
    recorded = [(200, 1000, 0.0004), (200, 2000, 0.003), (304, 0, 0.0001), (404, 150, 0.02), (500, 10, 7.0)]
    for i, (status, nbytes, seconds) in enumerate(recorded):
        user_only_server.slot(i % 2).record(status, nbytes, seconds)
    endpoint = start_metrics("127.0.0.1:0", PORT)
    try:
        m = scrape(f"http://127.0.0.1:{endpoint.port}/metrics")
    finally:
        endpoint.close()

    assert m["fileserver_up"] == {(): 1.0}
    req = m["fileserver_requests_total"]
    assert req[(("code", "2xx"), ("path", "user"))] == 2
    assert req[(("code", "3xx"), ("path", "user"))] == 1
    assert req[(("code", "4xx"), ("path", "user"))] == 1
    assert req[(("code", "5xx"), ("path", "user"))] == 1
    assert sum(v for k, v in req.items() if ("path", "kernel") in k) == 0  # started without the fast path
    assert m["fileserver_response_bytes_total"][(("path", "user"),)] == 3160

    hist = "fileserver_user_request_duration_seconds"
    assert m[hist + "_count"] == {(): 5.0}
    assert m[hist + "_sum"][()] == pytest.approx(7.0235)
    buckets = {dict(k)["le"]: v for k, v in m[hist + "_bucket"].items()}
    assert buckets["0.0005"] == 2  # 0.4 ms and 0.1 ms
    assert buckets["0.005"] == 3
    assert buckets["0.025"] == 4
    assert buckets["5.0"] == 4
    assert buckets[str(LATENCY_BUCKETS[-1])] == 5  # 7 s falls in the last bound, 10 s
    assert buckets["+Inf"] == 5
    assert m["fileserver_cache_entries"] == {(): 0.0}


def test_metrics_port_in_use_is_an_oserror_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"^.*cannot serve metrics on {addr}: Address already in use"):
            start_metrics(addr, PORT)


def test_families_of_a_kernel_snapshot_have_bounded_labels():
    """Every fs_stat counter becomes one fileserver_kernel_events_total{name=...} sample."""
    from test_tui import snapshot

    snap = snapshot()
    fams = {f.name: f for f in metrics.families(snap)}
    events = {s.labels["name"]: s.value for s in fams["fileserver_kernel_events"].samples}
    assert events == snap.counters and events["responses"] == 12345
    drops = {s.labels["reason"]: s.value for s in fams["fileserver_xdp_drops"].samples}
    assert drops == {"deny": 1500, "syn_rate": 7}
    req = {(s.labels["path"], s.labels["code"]): s.value for s in fams["fileserver_requests"].samples}
    assert req[("kernel", "2xx")] == 12300 and req[("kernel", "3xx")] == 45
    conns = {s.labels["state"]: s.value for s in fams["fileserver_connections"].samples}
    assert conns == {"open": 2, "fin_sent": 1, "handed_off": 4}
    runs = {s.labels["program"]: s.value for s in fams["fileserver_bpf_program_runs"].samples}
    assert runs == {p.name: p.run_cnt for p in snap.programs}
    assert runs["fileserver_ingress"] == 50_000 and runs["fileserver_xdp"] == 60_000


@pytest.mark.bpf
def test_scrape_of_real_maps_has_handoffs_and_xdp_drops_by_reason(pinned_server):
    """Hand-offs and XDP drops per reason, the reasons being the header's FS_STAT_HANDOFF_* and
    FS_STAT_XDP_DROP_* names; the hand-offs add up to `fsctl stats`' handed_off."""
    from fileserver_ctl import config, stats
    from fileserver_ctl.libbpf import Abi
    from test_stats import _seed

    if not os.access("/run", os.W_OK):
        pytest.skip("needs write access to /run (run as root)")
    port, obj = pinned_server
    abi = Abi(config.ABI_HEADER)
    _seed(obj, abi)  # handoff_miss 7, handoff_failed 5
    names = stats.counter_names(abi)
    ncpu = len(obj.map("stats")[names["responses"].to_bytes(4, "little")])
    drops = {name: 11 * (i + 1) for i, name in enumerate(n for n in names if n.startswith("xdp_drop_"))}
    assert len(drops) >= 2  # deny list and SYN rate at least
    for name, total in drops.items():
        obj.map("stats")[names[name].to_bytes(4, "little")] = [total.to_bytes(8, "little")] + [bytes(8)] * (ncpu - 1)

    with UserStats.create(port, 1):
        endpoint = start_metrics("127.0.0.1:0", port)
        try:
            m = scrape(f"http://127.0.0.1:{endpoint.port}/metrics")
        finally:
            endpoint.close()
        handed_off = stats.read_snapshot(port, programs=False).handed_off

    enum = [n.removeprefix("FS_STAT_").lower() for n in abi.enum("fs_stat")]
    handoffs = {dict(k)["reason"]: v for k, v in m["fileserver_handoffs_total"].items()}
    assert list(handoffs) == [n.removeprefix("handoff_") for n in enum
                              if n.startswith("handoff_") and n != "handoff_failed"]
    assert handoffs["miss"] == 7 and sum(handoffs.values()) == handed_off == 7
    assert m["fileserver_handoff_failures_total"] == {(): 5.0}
    xdp = {dict(k)["reason"]: v for k, v in m["fileserver_xdp_drops_total"].items()}
    assert xdp == {name.removeprefix("xdp_drop_"): total for name, total in drops.items()}
    assert {"deny", "syn_rate"} <= set(xdp)
    # every fs_stat counter is still there under its own name
    assert {dict(k)["name"] for k in m["fileserver_kernel_events_total"]} == set(names)
