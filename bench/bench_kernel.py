#!/usr/bin/env python3
"""The kernel fast path against user space alone and against nginx, interleaved, with wrk.

All servers run at once, each on a port of its own, on the same cached files (1 KiB, 16 KiB,
64 KiB): `fsctl up` (the TC program answers from its cache: one segment for 1 KiB, a windowed,
ACK-clocked sequence of segments for the others), `fsctl up -n` (user space only, one worker
per core) and nginx (sendfile on, open_file_cache on, one worker per core, access_log off). For
each file and mode (keep-alive, `Connection: close`) every server gets one wrk run per round,
the order rotating from round to round, so that whatever else loads the machine falls on all
of them alike; ratios are taken within a round. The table shows each server's median over the
rounds; the ratios their median and range; then the issues' targets (1 KiB: >= 3x nginx's
req/s in both modes and p99 under a tenth of nginx's; 64 KiB keep-alive: >= 2x nginx's req/s).
For the kernel path the pinned counters show how many answers the kernel sent, how many
requests it handed to user space and what its sender did (segments, resends, probes, timeouts).

--loss P: the same over a veth pair (MTU 1500, offloads off so a drop is one segment), wrk in
the namespace at the other end, where iptables drops a fraction P of the packets both ways.
Target: >= 0.8x nginx's throughput (the kernel's own TCP with its default congestion control)
and no stalled connection (no wrk timeout, no connection reset by the sender). The kernel
path's sender answers loss as RFC 5681/6675 say (halve the window); the kernel's default here
may be BBR, which does not back off on random loss, so --nginx-cc adds nginx peers whose
connections use other congestion controls (the route's congctl during their runs), e.g. cubic
(most distributions' default) and reno (the kernel path's rule). The client's TCP counters
(nstat in the namespace: only wrk's traffic) show what each server's losses cost the client.

    .venv/bin/python bench/bench_kernel.py [--duration 5] [--rounds 3] [--threads 2]
        [--connections 50] [--files 1k,16k,64k] [--modes keep-alive,close]
        [--loss 0.02 [--nginx-cc cubic,reno]] [--only SERVER]...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import harness  # bench/ is on sys.path when a script here runs
import nginx_conf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FILES = {"1k": ("f1k.bin", 1024), "16k": ("k16.bin", 16 * 1024), "64k": ("k64.bin", 64 * 1024)}
MODES = {"keep-alive": [], "close": ["-H", "Connection: close"]}
PORTS = range(18400, 18500)
KERNEL, USER, NGINX = "kernel path (fsctl up)", "user space (fsctl up -n)", "nginx"
# what the kernel path adds to its counters while sending in segments and recovering losses
SENDER_COUNTERS = ("multi_segment", "segments", "retransmit_fast", "retransmit_timeout", "tail_probes",
                   "rto_expiries", "window_stalls", "kicks", "watchdog_kicks", "rto_resets", "lock_waits",
                   "lock_timeouts", "dropped", "errors", "version_gone", "timer_failures", "kicks_queued_later", "kicks_later")
# the client's TCP counters that tell what a server's losses and timers cost it (lossy link)
CLIENT_COUNTERS = ("TcpRetransSegs", "TcpExtTCPOFOQueue", "TcpExtTCPDSACKOldSent", "TcpExtDelayedACKs",
                   "TcpExtTCPTimeouts")


@dataclass(frozen=True)
class Place:
    """Where the servers listen and where wrk runs: loopback, or a lossy veth pair."""

    host: str                    # address the servers listen on and wrk connects to
    interface: str               # where fsctl attaches
    wrap: tuple[str, ...] = ()   # prefix that runs wrk (ip netns exec ...)
    route: tuple[str, ...] = ()  # `ip route replace` arguments of the clients' subnet (lossy link)


@dataclass(frozen=True)
class Peer:
    name: str
    start: Callable[[Place, Path, int, Path], subprocess.Popen]
    stop_signal: int
    congestion: str | None = None  # the route's congctl during this peer's runs


@dataclass
class Result:
    server: str
    file: str
    mode: str
    round: int
    run: harness.WrkRun
    counters: dict[str, int] = field(default_factory=dict)  # kernel path: what moved
    client: dict[str, int] = field(default_factory=dict)    # lossy link: the client's TCP counters


def start_fsctl(place: Place, docroot: Path, port: int, tmp: Path, *, kernel: bool) -> subprocess.Popen:
    env = {**os.environ, "FILESERVER_PORT": str(port), "FILESERVER_DOCROOT": str(docroot),
           "FILESERVER_INTERFACE": place.interface, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fileserver_ctl", "up"] + ([] if kernel else ["-n"])
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def start_nginx(place: Place, docroot: Path, port: int, tmp: Path) -> subprocess.Popen:
    return nginx_conf.start_nginx(docroot, place.host, port, tmp)


def peers(names: list[str], congestion: list[str]) -> list[Peer]:
    known = {KERNEL: Peer(KERNEL, lambda pl, d, p, t: start_fsctl(pl, d, p, t, kernel=True), signal.SIGTERM),
             USER: Peer(USER, lambda pl, d, p, t: start_fsctl(pl, d, p, t, kernel=False), signal.SIGTERM),
             NGINX: Peer(NGINX, start_nginx, signal.SIGQUIT)}
    chosen = [known[n] for n in names]
    if NGINX in names:
        chosen += [Peer(f"nginx ({cc})", start_nginx, signal.SIGQUIT, cc) for cc in congestion]
    return chosen


def usable_port(port: int) -> bool:
    from fileserver_ctl import config

    return not config.pin_dir(port).exists()


def kernel_counters(port: int) -> dict[str, int]:
    """The kernel path's fs_stat counters, summed over CPUs, from the pinned map."""
    from fileserver_ctl import config, libbpf

    abi = libbpf.Abi(config.ABI_HEADER)
    names = {v: k.removeprefix("FS_STAT_").lower()
             for k, v in abi.enum("fs_stat").items() if k != "FS_STAT_MAX"}
    stats = libbpf.Map.from_pin(config.pin_dir(port) / "stats")
    try:
        return {name: sum(int.from_bytes(v[:8], "little") for v in stats[i.to_bytes(4, "little")])
                for i, name in names.items()}
    finally:
        stats.close()


def client_counters(place: Place) -> dict[str, int]:
    """The TCP counters of wrk's namespace (nothing else runs there)."""
    if not place.wrap:
        return {}
    out = subprocess.run([*place.wrap, "nstat", "-a", "-z", "-j"], capture_output=True, text=True,
                         timeout=10).stdout
    found: dict[str, int] = {}
    for group in json.loads(out or "{}").values():
        found.update(group)
    return {k: found.get(k, 0) for k in CLIENT_COUNTERS}


def set_congestion(place: Place, algorithm: str | None) -> None:
    """The congctl of the route to the clients (only on the lossy link: a route of our own)."""
    if place.route:
        subprocess.run(["ip", "route", "replace", *place.route, *(["congctl", algorithm] if algorithm else [])],
                       check=True, timeout=10)


def moved(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def handoffs(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if k.startswith("handoff_")}


def run_line(r: Result) -> str:
    w = r.run
    line = (f"  round {r.round + 1}  {r.server:26} {r.file:4} {r.mode:10} {w.rps:9.0f} req/s {w.mb_per_s:7.1f} MB/s"
            f"  p50 {w.p50_ms:7.2f}  p99 {w.p99_ms:8.2f}  max {w.max_ms:7.0f} ms  timeouts {w.timeouts}")
    if r.server == KERNEL:
        c = r.counters
        sender = ", ".join(f"{k} {c[k]}" for k in SENDER_COUNTERS if c.get(k))
        line += (f"\n      wrk counted {w.requests}; kernel answered {c.get('responses', 0)}, handed off "
                 f"{sum(handoffs(c).values())} {handoffs(c) or ''}; {sender}")
    if r.client:
        line += "\n      client: " + ", ".join(f"{k.removeprefix('TcpExt')} {v}" for k, v in r.client.items())
    return line


def measure(chosen: list[Peer], place: Place, docroot: Path, files: list[str], modes: list[str],
            args: argparse.Namespace, tmp: Path) -> list[Result]:
    lua = tmp / "latency.lua"
    lua.write_text(harness.LATENCY_LUA)
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    results: list[Result] = []
    try:
        for peer in chosen:
            if peer.congestion:
                continue  # the nginx of the default congestion control serves these too
            port = harness.free_port(PORTS, usable=usable_port)
            sdir = tmp / re.sub(r"\W+", "_", peer.name)
            sdir.mkdir()
            procs[peer.name] = (peer.start(place, docroot, port, sdir), port)
        for name, (proc, port) in procs.items():
            harness.wait_http(place.host, port, FILES[files[0]][0], proc)
        port_of = {p.name: procs[NGINX if p.congestion else p.name][1] for p in chosen}
        for key in files:
            path = FILES[key][0]
            for peer in chosen:  # warm up: caches, connections, the kernel cache's admission
                set_congestion(place, peer.congestion)
                harness.run_wrk(f"http://{place.host}:{port_of[peer.name]}/{path}", threads=args.threads,
                                connections=args.connections, duration=1, wrap=place.wrap)
            for mode in modes:
                for rnd in range(args.rounds):
                    order = chosen[rnd % len(chosen):] + chosen[:rnd % len(chosen)]
                    for peer in order:
                        port = port_of[peer.name]
                        set_congestion(place, peer.congestion)
                        before = kernel_counters(port) if peer.name == KERNEL else {}
                        client_before = client_counters(place)
                        run = harness.run_wrk(f"http://{place.host}:{port}/{path}", threads=args.threads,
                                              connections=args.connections, duration=args.duration,
                                              extra=MODES[mode], wrap=place.wrap, lua=lua)
                        after = kernel_counters(port) if peer.name == KERNEL else {}
                        result = Result(peer.name, key, mode, rnd, run, moved(before, after),
                                        moved(client_before, client_counters(place)))
                        results.append(result)
                        print(run_line(result), flush=True)
        set_congestion(place, None)
    finally:
        for peer in chosen:
            if peer.name in procs:
                harness.stop(procs[peer.name][0], peer.stop_signal)
    return results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def grouped(results: list[Result]) -> dict[tuple[str, str, str], list[Result]]:
    out: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        out.setdefault((r.server, r.file, r.mode), []).append(r)
    return out


def table(results: list[Result]) -> str:
    lines = [f"{'server':26} {'file':4} {'mode':10} {'req/s':>9} {'(min-max)':>15} {'p99 ms':>8} "
             f"{'max ms':>7} {'timeouts':>8} {'errors':>6}", "-" * 102]
    for (server, key, mode), rs in grouped(results).items():
        rps = [r.run.rps for r in rs]
        errors = sum(r.run.connect_errors + r.run.write_errors + r.run.non_2xx for r in rs)
        lines.append(f"{server:26} {key:4} {mode:10} {median(rps):9.0f} {f'({min(rps):.0f}-{max(rps):.0f})':>15} "
                     f"{median([r.run.p99_ms for r in rs]):8.2f} {max(r.run.max_ms for r in rs):7.0f} "
                     f"{sum(r.run.timeouts for r in rs):8d} {errors:6d}")
    return "\n".join(lines)


def ratio_of(results: list[Result], key: str, mode: str, other: str) -> tuple[float, float, float] | None:
    """Median, lowest and highest of the kernel path's req/s over `other`'s, round by round."""
    by = {(r.server, r.round): r for r in results if r.file == key and r.mode == mode}
    ratios = [by[(KERNEL, rnd)].run.rps / by[(other, rnd)].run.rps
              for (server, rnd) in by if server == KERNEL and (other, rnd) in by and by[(other, rnd)].run.rps]
    return (median(ratios), min(ratios), max(ratios)) if ratios else None


def summary(results: list[Result], loss: str | None) -> str:
    groups = grouped(results)
    files = list(dict.fromkeys(r.file for r in results))
    modes = list(dict.fromkeys(r.mode for r in results))
    others = [s for s in dict.fromkeys(r.server for r in results) if s != KERNEL]
    lines = ["ratios, kernel path / other, req/s within each round: median (lowest-highest):"]
    for other in others:
        for key in files:
            cells = []
            for mode in modes:
                found = ratio_of(results, key, mode, other)
                if found:
                    cells.append(f"{mode} {found[0]:5.2f}x ({found[1]:.2f}-{found[2]:.2f})")
            if cells:
                lines.append(f"  vs {other:26} {key:4} " + "; ".join(cells))
    lines.append("")
    for key in files:
        for mode in modes:
            found = ratio_of(results, key, mode, NGINX)
            kernel = groups.get((KERNEL, key, mode), [])
            if not found or not kernel:
                continue
            if loss:
                timeouts = sum(r.run.timeouts for r in kernel)
                resets = sum(r.counters.get("rto_resets", 0) for r in kernel)
                ok = found[0] >= 0.8 and timeouts == 0 and resets == 0
                lines.append(f"target ({key}, {mode}, {loss} loss): >= 0.8x nginx and no stalled "
                             f"connection: {found[0]:.2f}x, {timeouts} wrk timeouts, {resets} resets -> "
                             f"{'met' if ok else 'NOT met'}")
                for other in others:
                    if other.startswith("nginx ("):
                        ref = ratio_of(results, key, mode, other)
                        if ref:
                            lines.append(f"    for reference, vs {other}: {ref[0]:.2f}x")
            elif key == "1k":
                nginx = groups[(NGINX, key, mode)]
                k99, n99 = median([r.run.p99_ms for r in kernel]), median([r.run.p99_ms for r in nginx])
                lines.append(f"target (1k, {mode}): >= 3x nginx req/s: {found[0]:.2f}x -> "
                             f"{'met' if found[0] >= 3 else 'NOT met'}; p99 < nginx/10: {k99:.3f} vs "
                             f"{n99 / 10:.3f} ms -> {'met' if k99 < n99 / 10 else 'NOT met'}")
            elif key == "64k" and mode == "keep-alive":
                lines.append(f"target (64k, keep-alive): >= 2x nginx req/s: {found[0]:.2f}x -> "
                             f"{'met' if found[0] >= 2 else 'NOT met'}")
    for (server, key, mode), rs in groups.items():
        if server != KERNEL:
            continue
        counted = sum(r.run.requests for r in rs)
        answered = sum(r.counters.get("responses", 0) for r in rs)
        handed = {}
        for r in rs:
            for k, v in handoffs(r.counters).items():
                handed[k] = handed.get(k, 0) + v
        # a request that came with the client's FIN (wrk closing as a run ends) goes to user space
        other = sum(v for k, v in handed.items() if k != "handoff_other")
        verdict = "all in kernel" if other == 0 and answered >= counted else "NOT all in kernel"
        lines.append(f"kernel path ({key}, {mode}): wrk counted {counted}, kernel answered {answered}, handed "
                     f"off {sum(handed.values())} {handed or ''} -> {verdict}")
    return "\n".join(lines)


# `ethtool -K DEV tso|gso off` without ethtool: the legacy SIOCETHTOOL set commands
ETHTOOL_SET = {"tso": 0x1F, "gso": 0x24}  # ETHTOOL_STSO, ETHTOOL_SGSO
ETHTOOL = r'''
import array, fcntl, socket, struct, sys
request = array.array("I", [int(sys.argv[2]), 0])
ifreq = struct.pack("16sP", sys.argv[1].encode(), request.buffer_info()[0]) + bytes(16)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    fcntl.ioctl(s.fileno(), 0x8946, ifreq)
'''


@contextmanager
def lossy_link(loss: str) -> Iterator[Place]:
    """A veth pair: servers on the host end, wrk in the namespace, where iptables drops `loss`."""
    from fileserver_ctl.netns import veth_pair

    if shutil.which("iptables") is None:
        raise SystemExit("--loss needs iptables (this kernel has no netem)")
    with veth_pair() as pair:
        for dev, wrap in ((pair.host_if, []), (pair.peer_if, ["ip", "netns", "exec", pair.netns])):
            for feature in ("tso", "gso"):  # a drop is one segment, for every server alike
                subprocess.run([*wrap, sys.executable, "-c", ETHTOOL, dev, str(ETHTOOL_SET[feature])],
                               check=True, timeout=10)
        for chain in ("INPUT", "OUTPUT"):
            pair.run_in(["iptables", "-A", chain, "-m", "statistic", "--mode", "random", "--probability",
                         loss, "-j", "DROP"])
        prefix, last = pair.host_addr.rsplit(".", 1)
        route = (f"{prefix}.{int(last) - 1}/30", "dev", pair.host_if, "proto", "kernel", "scope", "link",
                 "src", pair.host_addr)
        yield Place(pair.host_addr, pair.host_if, ("ip", "netns", "exec", pair.netns), route)


@contextmanager
def loopback() -> Iterator[Place]:
    yield Place("127.0.0.1", "lo")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per server, file and mode")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--files", default="1k,16k,64k", help=f"comma-separated, of {', '.join(FILES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--loss", help="drop this fraction of packets both ways on a veth pair (e.g. 0.02)")
    parser.add_argument("--nginx-cc", default="",
                        help="with --loss: also nginx with these congestion controls (e.g. cubic,reno)")
    parser.add_argument("--only", action="append", choices=[KERNEL, USER, NGINX],
                        help="measure only these servers (repeatable)")
    args = parser.parse_args()
    files = [f for f in args.files.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    congestion = [c for c in args.nginx_cc.split(",") if c]
    if not set(files) <= set(FILES) or not set(modes) <= set(MODES) or not files or not modes:
        parser.error(f"--files takes {', '.join(FILES)}; --modes takes {', '.join(MODES)}")
    if args.rounds < 1 or args.duration < 1:
        parser.error("--rounds and --duration take a positive number")
    if args.loss is not None:
        try:
            if not 0 <= float(args.loss) < 1:
                raise ValueError
        except ValueError:
            parser.error("--loss takes a fraction in [0, 1), e.g. 0.02")
        available = Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
        if not set(congestion) <= set(available):
            parser.error(f"--nginx-cc takes {', '.join(available)}")
    elif congestion:
        parser.error("--nginx-cc needs --loss (it sets the congctl of the lossy link's route)")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if os.geteuid() != 0:
        raise SystemExit("the kernel path needs root (BPF load and attach)")
    names = args.only or [KERNEL, USER, NGINX]
    if NGINX in names and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("nginx not installed: skipped")
        names.remove(NGINX)
    chosen = peers(names, congestion)
    default_cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    where = f"a veth pair dropping {args.loss} both ways" if args.loss else "127.0.0.1"
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s, {args.rounds} rounds, on {where}; "
          f"files {', '.join(f'{FILES[f][0]} ({FILES[f][1]} bytes)' for f in files)}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}, kernel TCP congestion control {default_cc}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_kernel.") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)  # nginx workers run as nobody
        docroot = tmp / "www"
        docroot.mkdir()
        rng = random.Random(1)
        for name, size in FILES.values():
            (docroot / name).write_bytes(rng.randbytes(size))
            os.chmod(docroot / name, 0o644)
        with (lossy_link(args.loss) if args.loss else loopback()) as place:
            results = measure(chosen, place, docroot, files, modes, args, tmp)
    print()
    print(table(results))
    print()
    print(summary(results, args.loss))
    return 0


if __name__ == "__main__":
    sys.exit(main())
