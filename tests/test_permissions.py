"""Files the server may not read are answered 403, by both paths, the moment they become so.

nginx answers 403 when its worker cannot open a file. Running as root, the server reads what an
unprivileged worker could: a file others may not read is forbidden (fileserver_ctl/http_files.py).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from fileserver_ctl import config
from fileserver_ctl.http_files import FORBIDDEN, FileEntry, FileStore

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from stale_window import Pins, _read_reply, fsctl_up  # noqa: E402

AS_ROOT = os.geteuid() == 0


def test_unreadable_file_is_forbidden(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"a")
    os.chmod(tmp_path / "a.txt", 0)
    assert FileStore(tmp_path).lookup("/a.txt", "/a.txt") is FORBIDDEN


def test_unreadable_index_is_forbidden(tmp_path: Path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.html").write_bytes(b"i")
    os.chmod(tmp_path / "d" / "index.html", 0)
    assert FileStore(tmp_path).lookup("/d/", "/d/") is FORBIDDEN


@pytest.mark.skipif(not AS_ROOT, reason="owner-only files are readable to a non-root server")
def test_owner_only_file_is_forbidden_to_root(tmp_path: Path):
    (tmp_path / "a.txt").write_bytes(b"a")
    os.chmod(tmp_path / "a.txt", 0o600)
    assert FileStore(tmp_path).lookup("/a.txt", "/a.txt") is FORBIDDEN


def test_chmod_of_a_served_file_is_seen_at_once(tmp_path: Path):
    """The per-request stat() compares ctime too: chmod changes no mtime, size or inode."""
    path = tmp_path / "a.txt"
    path.write_bytes(b"a" * 10)
    store = FileStore(tmp_path)
    assert type(store.lookup("/a.txt", "/a.txt")) is FileEntry
    os.chmod(path, 0)
    assert store.lookup("/a.txt", "/a.txt") is FORBIDDEN
    os.chmod(path, 0o644)
    assert type(store.lookup("/a.txt", "/a.txt")) is FileEntry


@pytest.mark.skipif(not AS_ROOT, reason="a directory closed to others is closed to the server too")
def test_a_directory_closed_to_others_is_seen_within_a_clock_tick(tmp_path: Path):
    """chmod of a directory changes nothing the per-request stat() of the file compares; the
    directories on the way are checked again at the worker's next clock tick."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"a" * 10)
    store = FileStore(tmp_path)
    assert type(store.lookup("/d/a.txt", "/d/a.txt")) is FileEntry
    os.chmod(tmp_path / "d", 0o700)
    try:
        store.tick += 1
        assert store.lookup("/d/a.txt", "/d/a.txt") is FORBIDDEN
        os.chmod(tmp_path / "d", 0o755)
        assert type(store.lookup("/d/a.txt", "/d/a.txt")) is FileEntry
    finally:
        os.chmod(tmp_path / "d", 0o755)


def _get(port: int, name: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET /{name} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        status, body, _ = _read_reply(s, bytearray())
    return status, body


@pytest.mark.bpf
@pytest.mark.parametrize("kernel_cache", [True, False], ids=["kernel", "user"])
def test_made_unreadable_is_403_then_served_again(tmp_path: Path, free_port: int,
                                                   kernel_cache: bool):
    if kernel_cache and not config.BPF_OBJECT.exists():
        pytest.skip(f"{config.BPF_OBJECT} not built (run: make -C bpf)")
    path = tmp_path / "e.txt"
    path.write_bytes(b"E" * 300)
    args = () if kernel_cache else ("-n",)
    with fsctl_up(free_port, tmp_path, *args):
        pins = Pins(free_port) if kernel_cache else None
        try:
            assert _get(free_port, "e.txt") == (200, b"E" * 300)
            if pins is not None:
                before = pins.responses()
                assert _get(free_port, "e.txt") == (200, b"E" * 300)
                assert pins.responses() == before + 1  # the kernel answered it
            os.chmod(path, 0)
            status, body = _get(free_port, "e.txt")
            assert status == 403 and b"403 Forbidden" in body
            os.chmod(path, 0o644)
            assert _get(free_port, "e.txt") == (200, b"E" * 300)
        finally:
            os.chmod(path, 0o644)
            if pins is not None:
                pins.close()


@pytest.mark.skipif(not AS_ROOT, reason="a directory closed to others is closed to the server too")
@pytest.mark.bpf
@pytest.mark.parametrize("kernel_cache", [True, False], ids=["kernel", "user"])
def test_a_served_file_behind_a_directory_closed_to_others_is_403(tmp_path: Path, free_port: int,
                                                                  kernel_cache: bool):
    """The kernel drops the entry on the directory's IN_ATTRIB; the worker that keeps the file in
    memory sees it at its next clock tick (a second)."""
    if kernel_cache and not config.BPF_OBJECT.exists():
        pytest.skip(f"{config.BPF_OBJECT} not built (run: make -C bpf)")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "e.txt").write_bytes(b"E" * 300)
    args = () if kernel_cache else ("-n",)
    with fsctl_up(free_port, tmp_path, *args):
        try:
            for _ in range(3):  # the worker holds it in memory, the kernel in its cache
                assert _get(free_port, "d/e.txt") == (200, b"E" * 300)
            os.chmod(tmp_path / "d", 0o700)
            deadline = time.monotonic() + 3.0
            while (got := _get(free_port, "d/e.txt"))[0] == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert got[0] == 403
            os.chmod(tmp_path / "d", 0o755)
            deadline = time.monotonic() + 3.0
            while (got := _get(free_port, "d/e.txt"))[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert got == (200, b"E" * 300)
        finally:
            os.chmod(tmp_path / "d", 0o755)
