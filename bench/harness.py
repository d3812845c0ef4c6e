"""What the benchmarks (and the end-to-end tests) share: a free port, `fsctl up` started until it
listens, waiting for a server, stopping it, and one wrk run."""

from __future__ import annotations

import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
# wrk prints its own latency percentiles only up to 99%; this script adds the tail and the count
# of requests over each threshold, read from the same histogram
LATENCY_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("PERCENTILES_US %d %d %d %d %d\\n", latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


@dataclass(frozen=True)
class WrkRun:
    """What one wrk run printed."""

    requests: int
    rps: float
    mb_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int  # requests without an answer within wrk's --timeout: stalled connections
    non_2xx: int


def free_port(ports: range, host: str = "0.0.0.0", usable: Callable[[int], bool] = lambda port: True) -> int:
    """A port of `ports` nothing listens on (and that `usable` accepts)."""
    for port in random.sample(ports, len(ports)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if usable(port):
            return port
    raise SystemExit(f"no free port in {ports.start}-{ports.stop - 1}")


def wait_http(host: str, port: int, path: str, proc: subprocess.Popen, timeout: float = START_TIMEOUT) -> None:
    """Until a GET of `path` gets a 200 (a bare connect is not enough: the port may be bound early)."""
    deadline = time.monotonic() + timeout
    request = f"GET /{path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering")
        try:
            with socket.create_connection((host, port), timeout=1) as s:
                s.sendall(request)
                if re.match(rb"HTTP/1\.[01] 200 ", s.recv(64)):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"server on {port} did not answer within {timeout} s")


@dataclass
class Fsctl:
    """A running `fsctl up`: its process and everything it printed so far."""

    proc: subprocess.Popen
    output: list[str]
    reader: threading.Thread

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (SIGKILL after `timeout`), then its exit status once its output has ended."""
        stop(self.proc, timeout=timeout)
        self.reader.join(timeout=5)
        return self.proc.returncode


def start_fsctl(args: Sequence[str], port: int, *, env: Mapping[str, str] | None = None,
                stderr: int | None = subprocess.STDOUT, timeout: float = START_TIMEOUT) -> Fsctl:
    """`python -m fileserver_ctl up ARGS`, returned once it prints that it listens on `port`
    (the TC program answers SYNs itself, so a connect() proves nothing); a thread keeps
    collecting its output. Raises RuntimeError with what it printed otherwise."""
    proc = subprocess.Popen([sys.executable, "-m", "fileserver_ctl", "up", *args],
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=stderr, cwd=REPO, text=True)
    ready, lines = f"File server listening on port {port}", []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (not lines or lines[-1].strip() != ready):
        if not select.select([proc.stdout], [], [], 0.2)[0]:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    if not lines or lines[-1].strip() != ready:
        stop(proc, signal.SIGKILL, timeout=10)
        raise RuntimeError(f"fsctl up did not get ready:\n{''.join(lines)}")
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return Fsctl(proc, lines, reader)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(url: str, *, threads: int, connections: int, duration: int, extra: Sequence[str] = (),
            timeout_s: int = 5, wrap: Sequence[str] = (), lua: Path | None = None) -> WrkRun:
    """One wrk run (inside `wrap`, e.g. `ip netns exec NS`); `lua` is LATENCY_LUA written to a
    file, for the tail percentiles."""
    cmd = [*wrap, "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
           "--timeout", f"{timeout_s}s", *(["-s", str(lua)] if lua else []), *extra, url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = run.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if found is None or total is None:
        raise SystemExit(f"wrk failed: {' '.join(cmd)}\n{out}{run.stderr}")
    pct = {p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|90|99)%\s+([\d.]+)(us|ms|s)\b", out, re.M)}
    tail = re.search(r"PERCENTILES_US (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    p999 = max_ms = float("nan")
    if tail:
        p50, p90, p99, p999, max_ms = (int(v) / 1000 for v in tail.groups())
        pct.update({"50": p50, "90": p90, "99": p99})
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    mb = float(transfer.group(1)) * {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}[transfer.group(2)] \
        if transfer else float("nan")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeouts = (int(g) for g in errors.groups()) if errors else (0, 0, 0, 0)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    nan = float("nan")
    return WrkRun(int(total.group(1)), float(found.group(1)), mb, pct.get("50", nan), pct.get("90", nan),
                  pct.get("99", nan), p999, max_ms, connect, read, write, timeouts,
                  int(non_2xx.group(1)) if non_2xx else 0)
