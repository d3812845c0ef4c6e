"""What the end-to-end tests share: a free port, and `fsctl up` started until it listens."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fileserver_ctl import config

REPO = Path(__file__).resolve().parent.parent
TEST_PORTS = range(18000, 19000)
STARTUP_TIMEOUT = 30.0


def port_is_free(port: int) -> bool:
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def pick_port(ports: range = TEST_PORTS) -> int:
    """A port of `ports` nobody listens on and no server has pins for, picked at random so that
    concurrent runs rarely meet; skips the test when there is none."""
    for port in random.sample(ports, min(len(ports), 100)):
        if port_is_free(port) and not config.pin_dir(port).exists():
            return port
    pytest.skip(f"no free port in {ports.start}-{ports.stop - 1}")


@dataclass
class Fsctl:
    """A running `fsctl up`: its process and everything it printed so far."""

    proc: subprocess.Popen
    output: list[str]
    reader: threading.Thread

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM, then its exit status once it and its output have ended."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code


def start_fsctl(args: Sequence[str], port: int, *, env: Mapping[str, str] | None = None,
                stderr: int | None = subprocess.STDOUT) -> Fsctl:
    """`python -m fileserver_ctl up ARGS`, returned once it prints that it listens on `port`
    (the TC program answers SYNs itself, so a connect() proves nothing); a thread keeps
    collecting its output. Raises RuntimeError with what it printed otherwise."""
    proc = subprocess.Popen([sys.executable, "-m", "fileserver_ctl", "up", *args],
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=stderr, cwd=REPO, text=True)
    ready, lines = f"File server listening on port {port}", []
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline and (not lines or lines[-1].strip() != ready):
        if not select.select([proc.stdout], [], [], 0.5)[0]:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
    if not lines or lines[-1].strip() != ready:
        proc.kill()
        proc.wait(timeout=10)
        raise RuntimeError(f"fsctl up did not get ready: {''.join(lines)}")
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return Fsctl(proc, lines, reader)
