"""A throw-away network namespace joined to this one by a veth pair (for tests and benches).

The host end stays in the caller's namespace, where programs are attached; the peer end lives in
the new namespace, from which traffic is sent with `run_in()`. Everything is removed on exit,
also after a failure.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class VethPair:
    netns: str  # the namespace holding the peer end
    host_if: str  # in the caller's namespace
    peer_if: str  # inside netns
    host_addr: str  # IPv4 of host_if
    peer_addr: str  # IPv4 of peer_if

    @property
    def host_ifindex(self) -> int:
        return socket.if_nametoindex(self.host_if)

    def run_in(self, argv: Sequence[str], *, timeout: float = 10, check: bool = True,
               **kwargs: object) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (bounded by timeout)."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], timeout=timeout, check=check,
                              **kwargs)  # type: ignore[call-overload]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=check)


@contextmanager
def veth_pair(name: str = "fs") -> Iterator[VethPair]:
    """Create netns + veth with a /30 of 10.213.0.0/16 picked at random; remove both on exit.
    `name` starts the names of the namespace (`<name>ns-<tag>`) and of the devices."""
    tag = secrets.token_hex(3)
    subnet = int(tag, 16) & 0x3FFF  # 16384 /30 networks
    base = f"10.213.{subnet >> 6}.{(subnet & 0x3F) << 2}"
    prefix = base.rsplit(".", 1)[0]
    last = int(base.rsplit(".", 1)[1])
    pair = VethPair(netns=f"{name}ns-{tag}", host_if=f"{name}v{tag}h", peer_if=f"{name}v{tag}p",
                    host_addr=f"{prefix}.{last + 1}", peer_addr=f"{prefix}.{last + 2}")
    try:
        try:
            _ip("netns", "add", pair.netns)
            _ip("link", "add", pair.host_if, "type", "veth", "peer", "name", pair.peer_if,
                "netns", pair.netns)
            _ip("addr", "add", f"{pair.host_addr}/30", "dev", pair.host_if)
            _ip("link", "set", pair.host_if, "up")
            _ip("-n", pair.netns, "addr", "add", f"{pair.peer_addr}/30", "dev", pair.peer_if)
            _ip("-n", pair.netns, "link", "set", pair.peer_if, "up")
            _ip("-n", pair.netns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as exc:
            raise OSError(f"{' '.join(exc.cmd)}: {exc.stderr.strip()}") from None
        yield pair
    finally:
        _ip("link", "del", pair.host_if, check=False)  # takes the peer end with it
        _ip("netns", "del", pair.netns, check=False)
