"""`fsctl top` for real: a server started with `fsctl up`, the screen in a detached 80x24 tmux
session, traffic on loopback, and capture-pane showing the kernel counter rising and the client
XDP counted; q quits."""

from __future__ import annotations

import http.client
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fileserver_ctl import config, stats

pytestmark = pytest.mark.bpf

FSCTL = Path(sys.executable).parent / "fsctl"
TRAFFIC_SECONDS = 8.0
TRAFFIC_MAX_REQUESTS = 50_000


def _fsctl_has(*args: str) -> bool:
    try:
        return subprocess.run([str(FSCTL), *args, "--help"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.skip("tmux not installed")
    if not FSCTL.exists():
        pytest.skip(f"{FSCTL} not installed (make setup)")
    if not (_fsctl_has("up") and _fsctl_has("top")):
        pytest.skip("fsctl up / fsctl top not wired into cli.py yet")
    return path


def _wait_until_listening(port: int, proc: subprocess.Popen, seconds: float) -> None:
    """Wait for fsctl's "listening" line: the TC program answers SYNs before user space is up,
    so an accepted connection proves nothing."""
    ready = f"File server listening on port {port}"
    seen: list[str] = []
    deadline = time.monotonic() + seconds
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        if not select.select([proc.stdout], [], [], 0.2)[0]:
            continue
        line = proc.stdout.readline()
        if not line:
            proc.wait(timeout=10)
            pytest.fail(f"fsctl up exited {proc.returncode}: {''.join(seen)}")
        seen.append(line)
        if ready in line:
            # keep reading, so a chatty server never blocks on a full pipe
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return
    pytest.fail(f"fsctl up did not say {ready!r} within {seconds} s: {''.join(seen)}")


@pytest.fixture
def server(real_bpf_object: Path, bpffs: Path, free_port: int, tmp_path: Path):
    docroot = tmp_path / "www"
    docroot.mkdir()
    (docroot / "small.txt").write_bytes(b"x" * 512)
    proc = subprocess.Popen([str(FSCTL), "up", "-i", "lo", "-p", str(free_port), "-d", str(docroot)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        _wait_until_listening(free_port, proc, 30)
        yield free_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    assert not config.pin_dir(free_port).exists(), "fsctl up left its pins behind"


def _traffic(port: int, stop: threading.Event) -> None:
    """Keep-alive GETs of a cached file until stopped, bounded in time and count."""
    deadline = time.monotonic() + TRAFFIC_SECONDS
    sent = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        while not stop.is_set() and time.monotonic() < deadline and sent < TRAFFIC_MAX_REQUESTS:
            try:
                conn.request("GET", "/small.txt")
                conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            sent += 1
    finally:
        conn.close()


def _capture(tmux: str, session: str) -> str:
    return subprocess.run([tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True,
                          timeout=10).stdout


def _kernel_responses(screen: str) -> int | None:
    """The 'responses' column of the kernel row: path, req/s, bytes/s (2 words), responses, bytes."""
    for line in screen.splitlines():
        words = line.split()
        if words[:1] == ["kernel"] and len(words) >= 5:
            try:
                return int(words[-3].replace(",", ""))
            except ValueError:
                return None
    return None


def _client_row(screen: str, addr: str) -> list[str] | None:
    """The Top clients row of `addr`: address, conns, requests, bytes in (2 words), dropped, seen."""
    rows = screen.splitlines()
    for n, line in enumerate(rows):
        if line.startswith("Top clients"):
            for row in rows[n + 2:]:
                if row.split()[:1] == [addr]:
                    return row.split()
    return None


def _alive(tmux: str, session: str) -> bool:
    return subprocess.run([tmux, "has-session", "-t", session], capture_output=True, timeout=10).returncode == 0


def test_top_in_tmux_shows_the_kernel_counter_rising(tmux: str, server: int):
    port = server
    snap = stats.read_snapshot(port, programs=False)
    if not snap.kernel_path or snap.cached_files == 0:
        pytest.skip("fsctl up put nothing in the kernel cache: the fast path cannot answer yet (issue 4)")
    sysctl_before = stats.BPF_STATS_SYSCTL.read_text().strip()
    session = f"fsobs{os.getpid()}"
    subprocess.run([tmux, "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
                    f"{FSCTL} top -p {port}"], check=True, timeout=10)
    stop = threading.Event()
    load = threading.Thread(target=_traffic, args=(port, stop), daemon=True)
    try:
        load.start()
        seen: list[int] = []
        deadline = time.monotonic() + TRAFFIC_SECONDS
        while time.monotonic() < deadline and len(set(seen)) < 3:
            time.sleep(1.2)
            n = _kernel_responses(_capture(tmux, session))
            if n is not None:
                seen.append(n)
        screen = _capture(tmux, session)
        assert f"fileserver :{port}" in screen, screen
        assert len(set(seen)) >= 2 and seen == sorted(seen) and seen[-1] > seen[0] > 0, (
            f"kernel responses on screen did not rise ({seen}); is the fast path answering?\n{screen}")
        lines = screen.splitlines()
        assert len(lines) <= 24 and lines[0].startswith(f"fileserver :{port}"), screen  # nothing scrolled off
        if stats.read_snapshot(port, programs=False).top_clients:  # XDP attached and counting on lo
            row = _client_row(screen, "127.0.0.1")
            assert row is not None, f"127.0.0.1 not among the top clients\n{screen}"
            assert int(row[1].replace(",", "")) >= 1 and row[2] not in ("0", "-"), screen  # connections, requests

        subprocess.run([tmux, "send-keys", "-t", session, "q"], check=True, timeout=10)
        deadline = time.monotonic() + 5
        while _alive(tmux, session) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(tmux, session), "q did not quit fsctl top"
        assert stats.BPF_STATS_SYSCTL.read_text().strip() == sysctl_before, "bpf_stats_enabled not restored"
    finally:
        stop.set()
        load.join(timeout=10)
        subprocess.run([tmux, "kill-session", "-t", session], capture_output=True, timeout=10)
