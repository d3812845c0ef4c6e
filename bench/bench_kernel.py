#!/usr/bin/env python3
"""The kernel fast path against user space alone and against nginx, in one run, with wrk.

Starts, one after the other and on the same cached 1 KiB file: `fsctl up` (the TC program answers
from its cache), `fsctl up -n` (user space only, one worker per core) and nginx (sendfile on,
open_file_cache on, one worker per core, access_log off). Each is measured with keep-alive and
with `Connection: close`; the table shows req/s, p99 and errors, then the kernel path's ratios to
the others and the issue's targets (>= 3x nginx's req/s in both modes, p99 under a tenth of
nginx's). For the kernel path it also shows how many answers the kernel sent and how many
requests it handed to user space, from the pinned counters, so "all in kernel" is measured.

    .venv/bin/python bench/bench_kernel.py [--duration 5] [--threads 2] [--connections 50]
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
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

FILE, SIZE = "f1k.bin", 1024
MODES = {"keep-alive": [], "close": ["-H", "Connection: close"]}
PORTS = range(18200, 18250)
START_TIMEOUT = 30.0
KERNEL, USER, NGINX = "kernel path (fsctl up)", "user space (fsctl up -n)", "nginx"

NGINX_CONF = textwrap.dedent("""
    worker_processes {workers};
    daemon off;
    pid {tmp}/nginx.pid;
    error_log {tmp}/error.log warn;
    events {{ worker_connections 4096; }}
    http {{
        include /etc/nginx/mime.types;
        default_type application/octet-stream;
        access_log off;
        sendfile on;
        tcp_nopush on;
        open_file_cache max=1000 inactive=60s;
        open_file_cache_valid 60s;
        keepalive_requests 1000000;
        client_body_temp_path {tmp}/body;
        proxy_temp_path {tmp}/proxy;
        fastcgi_temp_path {tmp}/fastcgi;
        uwsgi_temp_path {tmp}/uwsgi;
        scgi_temp_path {tmp}/scgi;
        server {{
            listen 127.0.0.1:{port};
            root {docroot};
        }}
    }}
""")


@dataclass
class Result:
    server: str
    mode: str
    requests: int
    rps: float
    p99_ms: float
    errors: int
    counters: dict[str, int] = field(default_factory=dict)  # kernel path only: what moved


def free_port() -> int:
    from fileserver_ctl import config

    for port in random.sample(PORTS, len(PORTS)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if not config.pin_dir(port).exists():
            return port
    raise SystemExit("no free port in 18200-18249")


def wait_http(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    request = f"GET /{FILE} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(request)
                if re.match(rb"HTTP/1\.[01] 200 ", s.recv(64)):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server on {port} did not answer within {START_TIMEOUT} s")


def start_fsctl(docroot: Path, port: int, tmp: Path, *, kernel: bool) -> subprocess.Popen:
    env = {**os.environ, "FILESERVER_PORT": str(port), "FILESERVER_DOCROOT": str(docroot),
           "FILESERVER_INTERFACE": "lo", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "fileserver_ctl", "up"] + ([] if kernel else ["-n"])
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def start_nginx(docroot: Path, port: int, tmp: Path) -> subprocess.Popen:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workers=os.cpu_count() or 1, tmp=tmp, port=port,
                                      docroot=docroot))
    return subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


SERVERS = {
    KERNEL: (lambda d, p, t: start_fsctl(d, p, t, kernel=True), signal.SIGTERM),
    USER: (lambda d, p, t: start_fsctl(d, p, t, kernel=False), signal.SIGTERM),
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


def wrk(url: str, extra: list[str], args: argparse.Namespace, duration: int) -> tuple[int, float, float, int]:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{duration}s", "--latency",
           *extra, url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = run.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if found is None or total is None:
        raise SystemExit(f"wrk failed: {' '.join(cmd)}\n{out}{run.stderr}")
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    p99_ms = float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")
    errors = 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    return int(total.group(1)), float(found.group(1)), p99_ms, errors


def measure(name: str, docroot: Path, args: argparse.Namespace, tmp: Path) -> list[Result]:
    start, sig = SERVERS[name]
    port = free_port()
    sdir = tmp / re.sub(r"\W+", "_", name)
    sdir.mkdir()
    proc = start(docroot, port, sdir)
    results = []
    try:
        wait_http(port, proc)
        url = f"http://127.0.0.1:{port}/{FILE}"
        wrk(url, [], args, 1)  # warm up
        for mode, extra in MODES.items():
            before = kernel_counters(port) if name == KERNEL else {}
            total, rps, p99, errors = wrk(url, extra, args, args.duration)
            moved = {}
            if name == KERNEL:
                after = kernel_counters(port)
                moved = {k: after[k] - before[k] for k in after if after[k] != before[k]}
            results.append(Result(name, mode, total, rps, p99, errors, moved))
            line = f"  {name:26} {mode:10} {rps:10.0f} req/s  p99 {p99:8.3f} ms  errors {errors}"
            if name == KERNEL:
                handed = sum(v for k, v in moved.items() if k.startswith("handoff_"))
                line += (f"  (wrk counted {total}; kernel answered {moved.get('responses', 0)}, "
                         f"handed off {handed})")
            print(line, flush=True)
    finally:
        stop(proc, sig)
    return results


def table(results: list[Result]) -> str:
    lines = [f"{'server':26} {'mode':10} {'req/s':>10} {'p99 ms':>9} {'errors':>7}", "-" * 66]
    for r in results:
        lines.append(f"{r.server:26} {r.mode:10} {r.rps:10.0f} {r.p99_ms:9.3f} {r.errors:7d}")
    return "\n".join(lines)


def ratios(results: list[Result]) -> str:
    by = {(r.server, r.mode): r for r in results}
    lines = ["ratios, kernel path / other (req/s; p99 other/kernel in brackets):"]
    for other in (USER, NGINX):
        cells = []
        for mode in MODES:
            k, o = by.get((KERNEL, mode)), by.get((other, mode))
            if k and o and o.rps:
                cells.append(f"{mode}: {k.rps / o.rps:5.2f}x "
                             f"[{o.p99_ms / k.p99_ms if k.p99_ms else float('nan'):.1f}x]")
        if cells:
            lines.append(f"  vs {other:26} " + "; ".join(cells))
    for mode in MODES:
        k, n = by.get((KERNEL, mode)), by.get((NGINX, mode))
        if k and n and n.rps:
            rps_ok = k.rps >= 3 * n.rps
            p99_ok = k.p99_ms < n.p99_ms / 10
            lines.append(f"target ({mode}): >= 3x nginx req/s: {k.rps / n.rps:.2f}x -> "
                         f"{'met' if rps_ok else 'NOT met'}; p99 < nginx/10: "
                         f"{k.p99_ms:.3f} vs {n.p99_ms / 10:.3f} ms -> "
                         f"{'met' if p99_ok else 'NOT met'}")
    for mode in MODES:
        k = by.get((KERNEL, mode))
        if k:
            handed = sum(v for key, v in k.counters.items() if key.startswith("handoff_"))
            answered = k.counters.get("responses", 0)
            verdict = "all in kernel" if handed == 0 and answered >= k.requests else "NOT all in kernel"
            lines.append(f"kernel path ({mode}): wrk counted {k.requests}, kernel answered "
                         f"{answered}, handed off {handed}, errors {k.errors} -> {verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--only", action="append", choices=list(SERVERS),
                        help="measure only these servers (repeatable)")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    if os.geteuid() != 0:
        raise SystemExit("the kernel path needs root (BPF load and attach)")
    names = args.only or list(SERVERS)
    if NGINX in names and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("nginx not installed: skipped")
        names.remove(NGINX)
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s on 127.0.0.1, "
          f"{SIZE}-byte file, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M:%S')}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_kernel.") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)  # nginx workers run as nobody
        docroot = tmp / "www"
        docroot.mkdir()
        (docroot / FILE).write_bytes(random.Random(1).randbytes(SIZE))
        os.chmod(docroot / FILE, 0o644)
        results: list[Result] = []
        for name in names:
            results += measure(name, docroot, args, tmp)
    print()
    print(table(results))
    print()
    print(ratios(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
