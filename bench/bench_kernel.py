#!/usr/bin/env python3
"""The kernel fast path against user space alone and against nginx, in one run, with wrk.

Starts, one after the other and on the same cached files (1 KiB, 16 KiB, 64 KiB): `fsctl up`
(the TC program answers from its cache: one segment for 1 KiB, a windowed, ACK-clocked sequence
of segments for the others), `fsctl up -n` (user space only, one worker per core) and nginx
(sendfile on, open_file_cache on, one worker per core, access_log off). Each is measured on each
file with keep-alive and with `Connection: close`; the table shows req/s, p99 and errors, then
the kernel path's ratios to the others and the issues' targets (1 KiB: >= 3x nginx's req/s in
both modes and p99 under a tenth of nginx's; 64 KiB keep-alive: >= 2x nginx's req/s). For the
kernel path it also shows how many answers the kernel sent and how many requests it handed to
user space, from the pinned counters, so "all in kernel" is measured.

--loss P: the same over a veth pair instead of loopback (MTU 1500, offloads off so a drop is one
segment), wrk in the namespace at the other end, where iptables drops a fraction P of the
packets both ways; the kernel path (its own retransmissions, counted) against nginx (the
kernel's TCP): target >= 0.8x nginx's throughput, no stalled connection (wrk timeouts).

    .venv/bin/python bench/bench_kernel.py [--duration 5] [--threads 2] [--connections 50]
        [--files 1k,16k,64k] [--loss 0.02]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nginx_conf  # bench/ is on sys.path when a script here runs

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FILES = {"1k": ("f1k.bin", 1024), "16k": ("k16.bin", 16 * 1024), "64k": ("k64.bin", 64 * 1024)}
MODES = {"keep-alive": [], "close": ["-H", "Connection: close"]}
PORTS = range(18400, 18500)
START_TIMEOUT = 30.0
KERNEL, USER, NGINX = "kernel path (fsctl up)", "user space (fsctl up -n)", "nginx"
# what the kernel path adds to its counters while sending in segments and recovering losses
SENDER_COUNTERS = ("multi_segment", "segments", "retransmit_fast", "retransmit_timeout", "tail_probes",
                   "rto_expiries", "window_stalls", "rto_resets")




@dataclass
class Result:
    server: str
    file: str
    mode: str
    requests: int
    rps: float
    mb_per_s: float
    p99_ms: float
    errors: int
    timeouts: int
    counters: dict[str, int] = field(default_factory=dict)  # kernel path only: what moved


@dataclass(frozen=True)
class Place:
    """Where the servers listen and where wrk runs: loopback, or a lossy veth pair."""

    host: str                   # address the servers listen on and wrk connects to
    interface: str              # where fsctl attaches
    wrap: tuple[str, ...] = ()  # prefix that runs wrk (ip netns exec ...)


def free_port() -> int:
    from fileserver_ctl import config

    for port in random.sample(PORTS, len(PORTS)):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        if not config.pin_dir(port).exists():
            return port
    raise SystemExit("no free port in 18400-18499")


def wait_http(place: Place, port: int, path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    request = f"GET /{path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering")
        try:
            with socket.create_connection((place.host, port), timeout=1) as s:
                s.sendall(request)
                if re.match(rb"HTTP/1\.[01] 200 ", s.recv(64)):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server on {port} did not answer within {START_TIMEOUT} s")


def start_fsctl(place: Place, docroot: Path, port: int, tmp: Path, *, kernel: bool) -> subprocess.Popen:
    env = {**os.environ, "FILESERVER_PORT": str(port), "FILESERVER_DOCROOT": str(docroot),
           "FILESERVER_INTERFACE": place.interface, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fileserver_ctl", "up"] + ([] if kernel else ["-n"])
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def start_nginx(place: Place, docroot: Path, port: int, tmp: Path) -> subprocess.Popen:
    return nginx_conf.start_nginx(docroot, place.host, port, tmp)


SERVERS = {
    KERNEL: (lambda pl, d, p, t: start_fsctl(pl, d, p, t, kernel=True), signal.SIGTERM),
    USER: (lambda pl, d, p, t: start_fsctl(pl, d, p, t, kernel=False), signal.SIGTERM),
    NGINX: (start_nginx, signal.SIGQUIT),
}


def stop(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def wrk(place: Place, url: str, extra: list[str], args: argparse.Namespace,
        duration: int) -> tuple[int, float, float, float, int, int]:
    """(requests, req/s, MB/s, p99 ms, errors, timeouts) of one wrk run."""
    cmd = [*place.wrap, "wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--latency",
           "--timeout", "5s", *extra, url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = run.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if found is None or total is None:
        raise SystemExit(f"wrk failed: {' '.join(cmd)}\n{out}{run.stderr}")
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    mb = float(transfer.group(1)) * {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[transfer.group(2)] \
        if transfer else float("nan")
    errors = timeouts = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
        timeouts = int(m.group(4))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return int(total.group(1)), float(found.group(1)), mb, p99_ms, errors, timeouts


def measure(name: str, place: Place, docroot: Path, files: list[str], modes: list[str],
            args: argparse.Namespace, tmp: Path) -> list[Result]:
    start, sig = SERVERS[name]
    port = free_port()
    sdir = tmp / re.sub(r"\W+", "_", name)
    sdir.mkdir()
    proc = start(place, docroot, port, sdir)
    results = []
    try:
        wait_http(place, port, FILES[files[0]][0], proc)
        for key in files:
            path = FILES[key][0]
            url = f"http://{place.host}:{port}/{path}"
            wrk(place, url, [], args, 1)  # warm up
            for mode in modes:
                before = kernel_counters(port) if name == KERNEL else {}
                total, rps, mb, p99, errors, timeouts = wrk(place, url, MODES[mode], args, args.duration)
                moved = {}
                if name == KERNEL:
                    after = kernel_counters(port)
                    moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
                results.append(Result(name, key, mode, total, rps, mb, p99, errors, timeouts, moved))
                line = (f"  {name:26} {key:4} {mode:10} {rps:10.0f} req/s {mb:8.1f} MB/s  "
                        f"p99 {p99:8.3f} ms  errors {errors}")
                if name == KERNEL:
                    handed = sum(v for k, v in moved.items() if k.startswith("handoff_"))
                    sender = ", ".join(f"{k} {moved[k]}" for k in SENDER_COUNTERS if moved.get(k))
                    if handed:
                        sender += "; " + ", ".join(f"{k} {v}" for k, v in moved.items() if k.startswith("handoff_"))
                    line += (f"  (wrk counted {total}; kernel answered {moved.get('responses', 0)}, "
                             f"handed off {handed}{'; ' + sender if sender else ''})")
                print(line, flush=True)
    finally:
        stop(proc, sig)
    return results


def table(results: list[Result]) -> str:
    lines = [f"{'server':26} {'file':4} {'mode':10} {'req/s':>10} {'MB/s':>8} {'p99 ms':>9} {'errors':>7}",
             "-" * 80]
    for r in results:
        lines.append(f"{r.server:26} {r.file:4} {r.mode:10} {r.rps:10.0f} {r.mb_per_s:8.1f} {r.p99_ms:9.3f} "
                     f"{r.errors:7d}")
    return "\n".join(lines)


def ratios(results: list[Result], lossy: bool) -> str:
    by = {(r.server, r.file, r.mode): r for r in results}
    files = list(dict.fromkeys(r.file for r in results))
    modes = list(dict.fromkeys(r.mode for r in results))
    lines = ["ratios, kernel path / other (req/s; p99 other/kernel in brackets):"]
    for other in (USER, NGINX):
        for key in files:
            cells = []
            for mode in modes:
                k, o = by.get((KERNEL, key, mode)), by.get((other, key, mode))
                if k and o and o.rps:
                    cells.append(f"{mode}: {k.rps / o.rps:5.2f}x "
                                 f"[{o.p99_ms / k.p99_ms if k.p99_ms else float('nan'):.1f}x]")
            if cells:
                lines.append(f"  vs {other:26} {key:4} " + "; ".join(cells))
    for key in files:
        for mode in modes:
            k, n = by.get((KERNEL, key, mode)), by.get((NGINX, key, mode))
            if not (k and n and n.rps):
                continue
            if lossy:
                ok = k.rps >= 0.8 * n.rps and k.timeouts == 0
                lines.append(f"target ({key}, {mode}, lossy link): >= 0.8x nginx and no stalled connection: "
                             f"{k.rps / n.rps:.2f}x, {k.timeouts} wrk timeouts -> {'met' if ok else 'NOT met'}")
            elif key == "1k":
                rps_ok, p99_ok = k.rps >= 3 * n.rps, k.p99_ms < n.p99_ms / 10
                lines.append(f"target (1k, {mode}): >= 3x nginx req/s: {k.rps / n.rps:.2f}x -> "
                             f"{'met' if rps_ok else 'NOT met'}; p99 < nginx/10: "
                             f"{k.p99_ms:.3f} vs {n.p99_ms / 10:.3f} ms -> {'met' if p99_ok else 'NOT met'}")
            elif key == "64k" and mode == "keep-alive":
                lines.append(f"target (64k, keep-alive): >= 2x nginx req/s: {k.rps / n.rps:.2f}x -> "
                             f"{'met' if k.rps >= 2 * n.rps else 'NOT met'}")
    for r in results:
        if r.server != KERNEL:
            continue
        handed = sum(v for key, v in r.counters.items() if key.startswith("handoff_"))
        answered = r.counters.get("responses", 0)
        verdict = "all in kernel" if handed == 0 and answered >= r.requests else "NOT all in kernel"
        lines.append(f"kernel path ({r.file}, {r.mode}): wrk counted {r.requests}, kernel answered "
                     f"{answered}, handed off {handed}, errors {r.errors} -> {verdict}")
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
            for feature in ("tso", "gso"):  # a drop is one segment, for both servers alike
                subprocess.run([*wrap, sys.executable, "-c", ETHTOOL, dev, str(ETHTOOL_SET[feature])],
                               check=True, timeout=10)
        for chain in ("INPUT", "OUTPUT"):
            pair.run_in(["iptables", "-A", chain, "-m", "statistic", "--mode", "random", "--probability",
                         loss, "-j", "DROP"])
        yield Place(pair.host_addr, pair.host_if, ("ip", "netns", "exec", pair.netns))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--files", default="1k,16k,64k", help=f"comma-separated, of {', '.join(FILES)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--loss", help="drop this fraction of packets both ways on a veth pair (e.g. 0.02)")
    parser.add_argument("--only", action="append", choices=list(SERVERS),
                        help="measure only these servers (repeatable)")
    args = parser.parse_args()
    files = [f for f in args.files.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    if not set(files) <= set(FILES) or not set(modes) <= set(MODES) or not files or not modes:
        parser.error(f"--files takes {', '.join(FILES)}; --modes takes {', '.join(MODES)}")
    if args.loss is not None:
        try:
            if not 0 <= float(args.loss) < 1:
                raise ValueError
        except ValueError:
            parser.error("--loss takes a fraction in [0, 1), e.g. 0.02")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if os.geteuid() != 0:
        raise SystemExit("the kernel path needs root (BPF load and attach)")
    names = args.only or list(SERVERS)
    if NGINX in names and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("nginx not installed: skipped")
        names.remove(NGINX)
    where = f"a veth pair dropping {args.loss} both ways" if args.loss else "127.0.0.1"
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s on {where}, files "
          f"{', '.join(f'{FILES[f][0]} ({FILES[f][1]} bytes)' for f in files)}, {os.cpu_count()} cores, "
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
        results: list[Result] = []
        with (lossy_link(args.loss) if args.loss else _loopback()) as place:
            for name in names:
                results += measure(name, place, docroot, files, modes, args, tmp)
    print()
    print(table(results))
    print()
    print(ratios(results, lossy=bool(args.loss)))
    return 0


@contextmanager
def _loopback() -> Iterator[Place]:
    yield Place("127.0.0.1", "lo")


if __name__ == "__main__":
    sys.exit(main())
