"""A docroot holding what users' directories hold: FIFOs, sockets, device nodes, broken and
looping symlinks, links out of the docroot, names with a newline or bytes that are not UTF-8,
empty and large files, a directory others may not search.

`fsctl up` must start on it (filling the kernel cache must not block on a FIFO), answer each
name as nginx would (200 for a regular file asked with the right percent-encoding, 404 for what
is not a regular file inside the docroot, 403 for what an unprivileged reader may not reach),
on both paths, twice (the second time from the kernel cache where it holds the file), and stay
up without a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import pytest

from servers import start_ours

TIMEOUT = 5.0  # seconds an answer may take: a FIFO opened for reading would block forever
BIG = bytes(range(251)) * 1200  # 301,200 bytes: more than the kernel cache's largest file


def build(base: Path) -> Path:
    root, outside = base / "www", base / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(b"outside\n")
    (root / "index.html").write_bytes(b"<p>odd</p>\n")
    (root / "plain.txt").write_bytes(b"plain\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "big.bin").write_bytes(BIG)
    (root / "new\nline.txt").write_bytes(b"newline\n")
    (root / "tab\tname.txt").write_bytes(b"tab\n")
    (root / "q?x.txt").write_bytes(b"question\n")
    (root / "h#x.txt").write_bytes(b"hash\n")
    (root / "pc%41.txt").write_bytes(b"percent\n")
    os.mkfifo(root / "fifo.txt")
    (root / "fifolink.txt").symlink_to("fifo.txt")
    (root / "fifodir").mkdir()
    os.mkfifo(root / "fifodir" / "index.html")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock.txt"))
    os.mknod(root / "null.txt", 0o644 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "broken.txt").symlink_to(base / "nonexistent")
    (root / "loopa").symlink_to("loopb")
    (root / "loopb").symlink_to("loopa")
    (root / "escape.txt").symlink_to(outside / "secret.txt")
    (root / "escapedir").symlink_to(outside)
    (root / "private").mkdir()
    (root / "private" / "in.txt").write_bytes(b"private\n")
    os.chmod(root / "private", 0o700)  # others may not search it
    # a name that is not UTF-8: os.fsencode/fsdecode keep the byte through surrogateescape
    with open(os.fsencode(root) + b"/bad\xffname.txt", "wb") as f:
        f.write(b"not utf-8\n")
    base.chmod(0o755)
    return root


CASES = [  # (request target, status, body or None when not compared)
    ("/plain.txt", 200, b"plain\n"),
    ("/empty.txt", 200, b""),
    ("/big.bin", 200, BIG),
    ("/new%0Aline.txt", 200, b"newline\n"),
    ("/new%0aline.txt", 200, b"newline\n"),
    ("/tab%09name.txt", 200, b"tab\n"),
    ("/q%3Fx.txt", 200, b"question\n"),
    ("/h%23x.txt", 200, b"hash\n"),
    ("/pc%2541.txt", 200, b"percent\n"),
    ("/pc%41.txt", 404, None),  # that is /pcA.txt
    ("/bad%FFname.txt", 200, b"not utf-8\n"),
    ("/q?x.txt", 404, None),  # the query starts at "?": /q
    ("/fifo.txt", 404, None),
    ("/fifolink.txt", 404, None),
    ("/fifodir/", 404, None),
    ("/sock.txt", 404, None),
    ("/null.txt", 404, None),
    ("/broken.txt", 404, None),
    ("/loopa", 403, None),  # open() fails with ELOOP: nginx says 403 (test_parity_paths)
    ("/loopa/", 403, None),
    ("/escape.txt", 404, None),
    ("/escapedir/secret.txt", 404, None),
    ("/private/in.txt", 403, None),
]


def get(port: int, target: str) -> tuple[int, bytes]:
    """One GET on its own connection: (status, body)."""
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def docroot() -> Path:
    base = Path(tempfile.mkdtemp(prefix="odd-"))
    try:
        yield build(base)
    finally:
        shutil.rmtree(base)


def _start(kind: str, docroot: Path, *args: str):
    return start_ours(kind, docroot, "--workers", "1", *args)


@pytest.fixture(scope="module", params=["user", pytest.param("kernel", marks=pytest.mark.bpf)])
def server(request: pytest.FixtureRequest, docroot: Path) -> int:
    port, proc = _start(request.param, docroot)
    try:
        yield port
        assert get(port, "/")[0] == 200, "the server went down"
    finally:
        assert proc.stop() == 0, "".join(proc.output)
        assert "Traceback" not in "".join(proc.output), "".join(proc.output)


@pytest.mark.parametrize(("target", "status", "body"), CASES, ids=[c[0] for c in CASES])
def test_odd_names(server: int, target: str, status: int, body: bytes | None):
    for _ in range(2):  # the second answer may come from the kernel cache
        got, data = get(server, target)
        assert got == status
        if body is not None:
            assert data == body


@pytest.mark.parametrize("kind", ["user", pytest.param("kernel", marks=pytest.mark.bpf)])
def test_autoindex_lists_a_directory_holding_a_symlink_loop(kind: str, docroot: Path, tmp_path: Path):
    """The listing names what it cannot stat (a loop, a broken link) instead of failing whole."""
    port, proc = _start(kind, docroot, "--autoindex")
    try:
        status, page = get(port, "/fifodir/")  # its index.html is a FIFO: listed, not opened
        assert status == 200 and b">index.html<" in page
        (docroot / "index.html").rename(tmp_path / "index.html")
        try:
            status, page = get(port, "/")
        finally:
            (tmp_path / "index.html").rename(docroot / "index.html")
        assert status == 200, page
        for name in (b"loopa", b"broken.txt", b"plain.txt", b"new%0Aline.txt", b"bad%FFname.txt"):
            assert re.search(rb'href="' + re.escape(name) + rb'"', page), name
    finally:
        assert proc.stop() == 0
        assert "Traceback" not in "".join(proc.output), "".join(proc.output)
