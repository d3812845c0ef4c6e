#!/usr/bin/env python3
"""User-space server against its peers, in one run, with wrk on loopback.

Starts, one after the other and on the same files (1 KiB and 64 KiB): this server
(`fsctl up -n`: user space only, one worker per core), stock aiohttp `web.static` (one process),
`python3 -m http.server`, and nginx (sendfile on, open_file_cache on, one worker per core,
access_log off). Each is measured with keep-alive and with `Connection: close`; the table shows
req/s, p99 latency and errors, then our ratio to each peer and the issue's two targets
(>= 10x aiohttp web.static and >= 0.5x nginx, keep-alive, 1 KiB).

    .venv/bin/python bench/bench_http.py [--duration 5] [--threads 2] [--connections 50]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import harness  # bench/ is on sys.path when a script here runs
import nginx_conf

REPO = Path(__file__).resolve().parent.parent
FILES = {"1 KiB": ("f1k.bin", 1024), "64 KiB": ("f64k.bin", 65536)}
MODES = {"keep-alive": [], "close": ["-H", "Connection: close"]}
PORTS = range(18900, 19000)

AIOHTTP_STATIC = textwrap.dedent("""
    import sys
    from aiohttp import web
    app = web.Application()
    app.router.add_static("/", sys.argv[1])
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), access_log=None, print=None)
""")




@dataclass
class Result:
    server: str
    mode: str
    size: str
    rps: float
    p99_ms: float
    errors: int


def start_ours(docroot: Path, port: int, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "FILESERVER_PORT": str(port), "FILESERVER_DOCROOT": str(docroot),
           "PYTHONPATH": str(REPO)}
    if (REPO / "fileserver_ctl" / "cli.py").exists():
        cmd = [sys.executable, "-m", "fileserver_ctl", "up", "-n"]
    else:
        cmd = [sys.executable, "-c", "import sys; from fileserver_ctl.config import Settings; "
               "from fileserver_ctl.server import serve; sys.exit(serve(Settings.from_env()))"]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL)


def start_aiohttp(docroot: Path, port: int, tmp: Path) -> subprocess.Popen:
    script = tmp / "aiohttp_static.py"
    script.write_text(AIOHTTP_STATIC)
    return subprocess.Popen([sys.executable, str(script), str(docroot), str(port)],
                            stdout=subprocess.DEVNULL)


def start_http_server(docroot: Path, port: int, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(["python3", "-m", "http.server", "--bind", "127.0.0.1",
                             "--directory", str(docroot), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_nginx(docroot: Path, port: int, tmp: Path) -> subprocess.Popen:
    return nginx_conf.start_nginx(docroot, "127.0.0.1", port, tmp)


SERVERS = {
    "ours (fsctl up -n)": (start_ours, signal.SIGTERM),
    "aiohttp web.static": (start_aiohttp, signal.SIGINT),
    "python http.server": (start_http_server, signal.SIGINT),
    "nginx": (start_nginx, signal.SIGQUIT),
}


def wrk(url: str, extra: list[str], args: argparse.Namespace, duration: int) -> tuple[float, float, int]:
    run = harness.run_wrk(url, threads=args.threads, connections=args.connections, duration=duration,
                          extra=extra)
    # with Connection: close a read error per closed connection is how some servers end
    errors = run.connect_errors + run.write_errors + run.timeouts + run.non_2xx
    return run.rps, run.p99_ms, errors


def measure(name: str, docroot: Path, args: argparse.Namespace, tmp: Path) -> list[Result]:
    start, stop_sig = SERVERS[name]
    port = harness.free_port(PORTS, "127.0.0.1")
    sdir = tmp / re.sub(r"\W+", "_", name)
    sdir.mkdir()
    proc = start(docroot, port, sdir)
    results = []
    try:
        harness.wait_http("127.0.0.1", port, FILES["1 KiB"][0], proc)
        for size, (fname, _) in FILES.items():
            url = f"http://127.0.0.1:{port}/{fname}"
            wrk(url, [], args, 1)  # warm up: caches, JIT-free but page cache and workers
            for mode, extra in MODES.items():
                rps, p99, errors = wrk(url, extra, args, args.duration)
                results.append(Result(name, mode, size, rps, p99, errors))
                print(f"  {name:20} {mode:10} {size:6} {rps:10.0f} req/s  p99 {p99:8.2f} ms"
                      f"  errors {errors}", flush=True)
    finally:
        harness.stop(proc, stop_sig, timeout=15)
    return results


def table(results: list[Result]) -> str:
    lines = [f"{'server':20} {'mode':10} {'file':6} {'req/s':>10} {'p99 ms':>9} {'errors':>7}",
             "-" * 67]
    for r in results:
        lines.append(f"{r.server:20} {r.mode:10} {r.size:6} {r.rps:10.0f} {r.p99_ms:9.2f} "
                     f"{r.errors:7d}")
    return "\n".join(lines)


def ratios(results: list[Result]) -> str:
    ours_name = next(iter(SERVERS))
    by = {(r.server, r.mode, r.size): r for r in results}
    lines = ["ratios, ours / peer (req/s; p99 peer/ours in brackets):"]
    for peer in list(SERVERS)[1:]:
        cells = []
        for mode in MODES:
            for size in FILES:
                o, p = by.get((ours_name, mode, size)), by.get((peer, mode, size))
                if o and p and p.rps:
                    cells.append(f"{mode} {size}: {o.rps / p.rps:5.2f}x "
                                 f"[{p.p99_ms / o.p99_ms if o.p99_ms else float('nan'):.2f}]")
        lines.append(f"  vs {peer:20} " + "; ".join(cells))
    o = by.get((ours_name, "keep-alive", "1 KiB"))
    a = by.get(("aiohttp web.static", "keep-alive", "1 KiB"))
    n = by.get(("nginx", "keep-alive", "1 KiB"))
    if o and a:
        verdict = "met" if o.rps >= 10 * a.rps else "NOT met"
        lines.append(f"target >= 10x aiohttp web.static (keep-alive, 1 KiB): "
                     f"{o.rps / a.rps:.1f}x -> {verdict}")
    if o and n:
        verdict = "met" if o.rps >= 0.5 * n.rps else "NOT met"
        lines.append(f"target >= 0.5x nginx (keep-alive, 1 KiB): {o.rps / n.rps:.2f}x -> {verdict}")
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
    names = args.only or list(SERVERS)
    if "nginx" in names and not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        print("nginx not installed: skipped")
        names.remove("nginx")
    print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s on 127.0.0.1, "
          f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_http.") as tmpdir:
        tmp = Path(tmpdir)
        os.chmod(tmp, 0o755)  # nginx workers run as nobody
        docroot = tmp / "www"
        docroot.mkdir()
        rng = random.Random(1)
        for fname, size in FILES.values():
            (docroot / fname).write_bytes(rng.randbytes(size))
            os.chmod(docroot / fname, 0o644)
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
