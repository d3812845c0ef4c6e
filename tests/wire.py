"""Reading HTTP/1.1 answers off a raw socket, for the clients the tests run inside network
namespaces (`python -c` with this directory as its working directory, so `import wire` works)."""

from __future__ import annotations

import socket


def read_answer(sock: socket.socket, buf: bytes, head_only: bool = False
                ) -> tuple[bytes, int, dict[str, str], bytes, bytes]:
    """The next answer on sock, `buf` holding what was read past the previous one: (head up to
    and with its empty line, status, fields by lower-case name, body, bytes after the body).
    No body after a HEAD (head_only), a 204 or a 304. ConnectionError when the server closes
    early; sock's timeout bounds every read."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the end of the head ({len(buf)} bytes)")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    fields = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
    length = 0 if head_only or status in (204, 304) else int(fields.get("content-length", "0"))
    while len(buf) < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {length} body bytes")
        buf += chunk
    return head + b"\r\n\r\n", status, fields, buf[:length], buf[length:]


def connect(host: str, port: int, timeout: float, mss: int = 0, rcvbuf: int = 0) -> socket.socket:
    """A TCP connection to host (IPv6 when it holds a colon) with every read bounded by timeout;
    mss and rcvbuf, when given, set before connecting what the SYN offers."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if mss:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        if rcvbuf:  # the window scale and the window follow it
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect((host, port))
    except OSError:
        sock.close()
        raise
    return sock
