"""A client that only waits for the port to accept connections, as most do, gets answers.

The TC program answers SYNs itself, so a connect() succeeds as soon as it is attached; each
connection it cannot answer goes to the kernel's listener. `fsctl up` therefore listens before
it attaches (and fills the cache), and the first request on the first connection that succeeds
is answered, however long the cache takes to fill. With thousands of cached files (one lease
descriptor each) the server's own descriptors are numbered past select()'s 1,024.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from servers import REPO, pick_port
from harness import stop

from fileserver_ctl.readiness import readable

FILES = 3000  # enough that filling the cache takes a noticeable while after the attach
BODY = b"first light\n"
DEADLINE_S = 60


def _first_connection(port: int, proc: subprocess.Popen) -> socket.socket:
    """The first connection to the port that succeeds, tried every few milliseconds."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "fsctl up exited"
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=0.5)
        except OSError:
            time.sleep(0.002)
    raise AssertionError(f"nothing accepted a connection on port {port} in {DEADLINE_S} s")


def test_first_connection_that_succeeds_is_answered(tmp_path: Path):
    for i in range(FILES):
        (tmp_path / f"f{i:05d}.txt").write_bytes(b"%05d\n" % i)
    (tmp_path / "first.txt").write_bytes(BODY)
    port = pick_port()
    proc = subprocess.Popen([sys.executable, "-m", "fileserver_ctl", "up", "-p", str(port),
                             "-d", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        with _first_connection(port, proc) as conn:
            conn.settimeout(DEADLINE_S)
            conn.sendall(b"GET /first.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            try:
                while chunk := conn.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                raise AssertionError(f"reset after {answer!r}") from None
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and answer.endswith(b"\r\n\r\n" + BODY), answer
    finally:
        stop(proc)
        output = proc.stdout.read()
    assert proc.returncode == 0, output


def test_readiness_past_descriptor_1024():
    r, w = os.pipe()
    high = os.dup2(r, 1500)
    try:
        assert readable([high], 0) == []
        os.write(w, b"x")
        assert readable([high], 1.0) == [high]
    finally:
        for fd in (r, w, high):
            os.close(fd)
