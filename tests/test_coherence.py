"""The kernel cache never answers a changed file's old bytes: `fsctl up` on lo, real files.

Each way a file can change (written in place, truncated, replaced by a rename, deleted, made
unreadable, a new file appearing) is made once while the file is cached, and the very next
request, sent as soon as the change returned, must not get old bytes from the kernel; then the
file must come back to the kernel cache once it has settled. The measured window
(bench/stale_window.py) then changes a cached file 1,000 times under continuous reads.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver_ctl import config, kernel
from servers import pick_port

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import stale_window  # noqa: E402
from stale_window import Pins, _read_reply, fsctl_up  # noqa: E402

PORTS = range(18530, 18560)
REFILL_TIMEOUT = 3.0  # seconds for a settled file to be cached again
TRACEPOINTS = kernel.kernel_has_tracepoints(list(kernel.COHERENCE_PROGRAMS.values()))


class Site:
    """A running `fsctl up`, its docroot and its pinned maps."""

    def __init__(self, server: stale_window.Server) -> None:
        self.server, self.port, self.docroot = server, server.port, server.docroot
        self.pins = Pins(server.port)

    def get(self, name: str) -> tuple[int, bytes, bool]:
        """(status, body, answered by the kernel) for GET /name on a new connection."""
        before = self.pins.responses()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(f"GET /{name} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            status, body, _ = _read_reply(s, bytearray())
        return status, body, self.pins.responses() > before

    def cached(self, name: str) -> bool:
        try:
            return self.pins.cached("/" + name, os.stat(self.docroot / name))
        except FileNotFoundError:
            return False

    def wait_cached(self, name: str, timeout: float = REFILL_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cached(name):
                return True
            time.sleep(0.005)
        return False

    def kernel_serves(self, name: str, body: bytes) -> None:
        """The file is cached again and the kernel answers it with `body`."""
        assert self.wait_cached(name), f"{name} was not cached again"
        assert self.get(name) == (200, body, True)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    if not config.BPF_OBJECT.exists():
        pytest.skip(f"{config.BPF_OBJECT} not built (run: make -C bpf)")
    docroot = Path(tempfile.mkdtemp(prefix="coherence-"))
    try:
        for name in ("a.txt", "b.txt", "c.txt", "d.txt", "e.txt"):
            (docroot / name).write_bytes(name.encode() * 100)
        with fsctl_up(pick_port(PORTS), docroot, "-v", "--workers", "2") as server:
            s = Site(server)
            try:
                yield s
            finally:
                s.pins.close()
    finally:
        shutil.rmtree(docroot, ignore_errors=True)


def test_up_says_which_mechanism_is_active(site: Site):
    text = "".join(site.server.output)
    line = next(line for line in text.splitlines() if line.startswith("Cache coherence: "))
    assert ("inode ctime tracepoints" in line) == TRACEPOINTS
    assert "inotify" in line


def test_doctor_says_which_mechanism_is_active():
    out = subprocess.run([sys.executable, "-m", "fileserver_ctl", "doctor"], capture_output=True, text=True,
                         cwd=REPO, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    if "fentry" in out and "refused" in out:
        assert ("inode ctime tracepoints" in out) == TRACEPOINTS, out


def test_written_in_place(site: Site):
    path = site.docroot / "a.txt"
    site.kernel_serves("a.txt", path.read_bytes())
    with open(path, "r+b") as f:  # the same length, new bytes, no truncation
        f.write(b"A" * 500)
    assert site.get("a.txt") == (200, b"A" * 500, False)
    site.kernel_serves("a.txt", b"A" * 500)
    with open(path, "wb") as f:  # O_TRUNC, then longer
        f.write(b"AA" * 400)
    assert site.get("a.txt") == (200, b"AA" * 400, False)
    site.kernel_serves("a.txt", b"AA" * 400)


def test_truncated(site: Site):
    path = site.docroot / "b.txt"
    body = path.read_bytes()
    site.kernel_serves("b.txt", body)
    os.truncate(path, 10)
    assert site.get("b.txt") == (200, body[:10], False)
    site.kernel_serves("b.txt", body[:10])


def test_replaced_by_an_atomic_rename(site: Site):
    site.kernel_serves("c.txt", (site.docroot / "c.txt").read_bytes())
    tmp = site.docroot / ".c.txt.new"
    tmp.write_bytes(b"C" * 300)
    os.rename(tmp, site.docroot / "c.txt")
    assert site.get("c.txt") == (200, b"C" * 300, False)
    site.kernel_serves("c.txt", b"C" * 300)


def test_deleted_then_created_again(site: Site):
    path = site.docroot / "d.txt"
    site.kernel_serves("d.txt", path.read_bytes())
    path.unlink()
    status, _, by_kernel = site.get("d.txt")
    assert (status, by_kernel) == (404, False)
    path.write_bytes(b"D" * 200)
    assert site.get("d.txt") == (200, b"D" * 200, False)  # user space first...
    site.kernel_serves("d.txt", b"D" * 200)  # ...then admitted


def test_made_unreadable(site: Site):
    """chmod 000: the kernel stops answering at once and does not take the file back while it
    is unreadable; what user space answers is its own business (as root it may still read it)."""
    path = site.docroot / "e.txt"
    site.kernel_serves("e.txt", path.read_bytes())
    os.chmod(path, 0)
    try:
        status, _, by_kernel = site.get("e.txt")
        assert not by_kernel
        time.sleep(1.5)  # a re-check and a sweep later...
        assert not site.cached("e.txt")
        assert not site.get("e.txt")[2]
    finally:
        os.chmod(path, 0o644)
    site.get("e.txt")
    site.kernel_serves("e.txt", path.read_bytes())


def test_a_new_file_is_served_then_admitted(site: Site):
    path = site.docroot / "new.txt"
    path.write_bytes(b"new!")
    assert site.get("new.txt") == (200, b"new!", False)
    site.kernel_serves("new.txt", b"new!")


# inotify is asynchronous: the watcher sees a rename in well under a millisecond; the once-a-second
# re-check, the only other thing that would notice, takes up to a second
WATCHER_BOUND = 0.25


def _until(check, bound: float = WATCHER_BOUND) -> float | None:
    """Seconds until check() held (polled), or None if it did not within bound."""
    start = time.monotonic()
    while time.monotonic() - start < bound:
        if check():
            return time.monotonic() - start
        time.sleep(0.002)
    return None


def test_a_directory_symlink_swapped_to_a_new_release(site: Site):
    """A release switched the usual way, a new symlink renamed over the old one (ln -s rel2
    cur.new && mv -T cur.new cur): files under it stop coming from the old release as soon as
    the watcher has seen the rename, though no cached file changed; then the new release is
    cached and watched in its turn: a directory of it made unsearchable stops the kernel (what
    user space answers then is its own business, as in test_made_unreadable)."""
    d = site.docroot
    for rel, body in (("rel1", b"one" * 50), ("rel2", b"two" * 50)):
        (d / rel).mkdir()
        (d / rel / "y.txt").write_bytes(body)
    os.symlink("rel1", d / "cur")
    try:
        site.get("cur/y.txt")
        site.kernel_serves("cur/y.txt", b"one" * 50)
        os.symlink("rel2", d / "cur.new")
        os.rename(d / "cur.new", d / "cur")
        assert _until(lambda: site.get("cur/y.txt")[:2] == (200, b"two" * 50)) is not None
        site.kernel_serves("cur/y.txt", b"two" * 50)
        os.chmod(d / "rel2", 0o700)  # others may not search it: nginx's workers get 403
        assert _until(lambda: not site.get("cur/y.txt")[2]) is not None
    finally:
        os.chmod(d / "rel2", 0o755)
        (d / "cur").unlink()
        shutil.rmtree(d / "rel1")
        shutil.rmtree(d / "rel2")


def test_a_directory_renamed_away_and_another_renamed_in(site: Site):
    """mv site site.old && mv site.new site: the old files stop, the new ones are served, and
    what changes inside the new directory is seen too: its watch is on the new directory, not
    on the one renamed away (a symlink swapped in it is seen only by that watch)."""
    d = site.docroot
    for rel, body in (("site", b"old" * 50), ("site.new", b"new" * 50)):
        (d / rel / "a").mkdir(parents=True)
        (d / rel / "b").mkdir()
        (d / rel / "z.txt").write_bytes(body)
        (d / rel / "a" / "x.txt").write_bytes(b"a" + body)
        (d / rel / "b" / "x.txt").write_bytes(b"b" + body)
        os.symlink("a", d / rel / "cur")
    try:
        site.get("site/z.txt")
        site.kernel_serves("site/z.txt", b"old" * 50)
        os.rename(d / "site", d / "site.old")
        os.rename(d / "site.new", d / "site")
        assert _until(lambda: site.get("site/z.txt")[:2] == (200, b"new" * 50)) is not None
        site.kernel_serves("site/z.txt", b"new" * 50)
        site.get("site/cur/x.txt")
        site.kernel_serves("site/cur/x.txt", b"a" + b"new" * 50)
        os.symlink("b", d / "site" / "cur.new")
        os.rename(d / "site" / "cur.new", d / "site" / "cur")
        assert _until(lambda: site.get("site/cur/x.txt")[:2] == (200, b"b" + b"new" * 50)) is not None
    finally:
        for rel in ("site", "site.old", "site.new"):
            shutil.rmtree(d / rel, ignore_errors=True)


@pytest.mark.slow
def test_stale_window_under_1000_changes():
    """bench/stale_window.py's measurement: no stale answer after an in-place write or a
    truncation returned, none from the kernel while the file is unreadable, and renames and
    deletes within a generous bound (the bench prints the exact figures)."""
    docroot = Path(tempfile.mkdtemp(prefix="stale-window-"))
    try:
        (docroot / stale_window.NAME).write_bytes(stale_window.version_body(0, 2000))
        with fsctl_up(pick_port(PORTS), docroot, "--workers", "2") as server:
            started = time.monotonic()
            result = stale_window.measure(server.port, docroot, 1000)
            took = time.monotonic() - started
    finally:
        shutil.rmtree(docroot, ignore_errors=True)
    report = f"{took:.1f} s\n{result.report()}"
    print(report)
    assert result.changes == 1000, report
    assert result.stale["in place"] == 0, report
    assert result.kernel_while_unreadable == 0, report
    assert result.percentile("replaced", 0.99) < 50.0, report
    # the measurement means something only if the kernel was answering when the file changed
    assert result.served >= 0.8 * result.cacheable and result.kernel_replies > 0, report
    assert result.errors <= 10, report
