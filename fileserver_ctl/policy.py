"""The XDP program's per-client maps (bpf/xdp.bpf.h): the policy written in, the figures read out.

- deny list: `deny_v4` / `deny_v6`, LPM tries of source prefixes -> segments dropped so far;
- SYN rate: `xdp_policy[0]`, the interval and burst of each client's GCRA schedule;
- per-client figures: `client_stats`, an LRU hash of client address -> connections, requests,
  bytes, last seen (entries idle longer than FS_CLIENT_IDLE_NS are stale and start afresh).

`fsctl up --deny CIDR --syn-rate N` writes the policy before serving (apply()); `fsctl deny` and
`fsctl allow` change the deny list of a running server through its pinned maps (DenyList.pinned()).
Layouts come from bpf/fileserver.h through libbpf.Abi; nothing about them is copied here.
"""

from __future__ import annotations

import errno
import ipaddress
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import config

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DENY_MAPS = {4: ("deny_v4", "struct fs_deny_v4"), 6: ("deny_v6", "struct fs_deny_v6")}
CLIENT_MAP = "client_stats"
POLICY_MAP = "xdp_policy"
NS_PER_S = 1_000_000_000
SYN_RATE_MAX = 1_000_000  # beyond this the interval (1 s / rate) is too short to mean anything
IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


class PolicyMapsMissing(LookupError):
    """The loaded object (or the running server) has no XDP policy maps; str() says which."""


def parse_cidr(text: str) -> Network:
    """'203.0.113.0/24', '2001:db8::/32' or a bare address (one host) -> a network.

    Host bits are cleared ('10.1.2.3/8' is 10.0.0.0/8, as nginx's deny reads it). IPv4-mapped
    IPv6 prefixes become IPv4: IPv4 clients reach XDP as IPv4 packets even on a dual-stack socket.
    Raises ValueError with a one-line message.
    """
    cleaned = text.strip()
    try:
        network = ipaddress.ip_network(cleaned, strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR {text!r}: expected an address or ADDRESS/PREFIX, "
                         "e.g. 203.0.113.0/24 or 2001:db8::/32") from None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 \
            and network.subnet_of(IPV4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        network = ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def syn_schedule(rate: int) -> tuple[int, int]:
    """(interval_ns, burst_ns) of struct fs_xdp_policy for `rate` new connections per second.

    A client may open `rate` connections at once after a quiet second, then one per interval.
    0 means no limit.
    """
    if rate == 0:
        return 0, 0
    if not 1 <= rate <= SYN_RATE_MAX:
        raise ValueError(f"invalid SYN rate {rate}: expected 1-{SYN_RATE_MAX} per second (0: no limit)")
    interval = NS_PER_S // rate
    return interval, (rate - 1) * interval


def _abi(header: Path = config.ABI_HEADER) -> Any:
    from .libbpf import Abi

    return Abi(header)


def _required(maps: Mapping[str, Any], *names: str) -> list[Any]:
    missing = [name for name in names if name not in maps]
    if missing:
        raise PolicyMapsMissing(f"the BPF object has no {', '.join(missing)} map "
                                f"(rebuild it: make -C bpf)")
    return [maps[name] for name in names]


@dataclass(frozen=True)
class DenyEntry:
    network: str
    drops: int  # segments to the server port dropped by this entry


class DenyList:
    """The deny_v4/deny_v6 tries as a set of networks. Membership is by exact prefix: the
    tries' own lookup is longest-prefix, so adding checks with NOEXIST instead."""

    def __init__(self, maps: Mapping[str, Any], abi: Any) -> None:
        self._maps = dict(zip((4, 6), _required(maps, DENY_MAPS[4][0], DENY_MAPS[6][0])))
        self._abi = abi

    @classmethod
    @contextmanager
    def pinned(cls, port: int) -> Iterator[DenyList]:
        """The deny list of the server running on `port`, through its pins."""
        from .libbpf import Map

        pins = config.pin_dir(port)
        opened: dict[str, Any] = {}
        try:
            for name, _ in DENY_MAPS.values():
                try:
                    opened[name] = Map.from_pin(pins / name)
                except FileNotFoundError:
                    raise PolicyMapsMissing(f"no deny list pinned for port {port} ({pins / name})") from None
            yield cls(opened, _abi())
        finally:
            for m in opened.values():
                m.close()

    def _key(self, network: Network) -> bytes:
        _, ctype = DENY_MAPS[network.version]
        return self._abi.pack(ctype, {"prefixlen": network.prefixlen, "addr": network.network_address.packed})

    def add(self, network: Network) -> bool:
        """Deny `network`; False when it was denied already (its drop count is kept)."""
        from .libbpf import UpdateFlags

        try:
            self._maps[network.version].update(self._key(network), bytes(8), UpdateFlags.NOEXIST)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            if exc.errno == errno.ENOSPC:
                limit = self._abi.const("FS_DENY_ENTRIES")
                raise OSError(errno.ENOSPC, f"the deny list is full ({limit} IPv{network.version} entries)") from None
            raise
        return True

    def remove(self, network: Network) -> bool:
        """Allow `network` again; False when it was not in the list (as this exact prefix)."""
        try:
            del self._maps[network.version][self._key(network)]
        except KeyError:
            return False
        return True

    def entries(self) -> list[DenyEntry]:
        """Every denied network with its drop count, IPv4 first, in address order."""
        found: list[tuple[Network, int]] = []
        for version, m in self._maps.items():
            _, ctype = DENY_MAPS[version]
            for key in list(m):
                try:
                    value = m[key]
                except KeyError:
                    continue  # removed while we walked
                fields = self._abi.unpack(ctype, key)
                address = ipaddress.ip_address(fields["addr"])
                found.append((ipaddress.ip_network((address, fields["prefixlen"])), int.from_bytes(value[:8], "little")))
        found.sort(key=lambda item: (item[0].version, item[0].network_address, item[0].prefixlen))
        return [DenyEntry(str(net), drops) for net, drops in found]


def set_syn_rate(maps: Mapping[str, Any], rate: int, abi: Any | None = None) -> None:
    """Write the SYN rate limit (new connections per second per client; 0: none)."""
    (policy_map,) = _required(maps, POLICY_MAP)
    interval, burst = syn_schedule(rate)
    abi = abi or _abi()
    policy_map[bytes(4)] = abi.pack("struct fs_xdp_policy", {"syn_interval_ns": interval, "syn_burst_ns": burst})


def apply(maps: Mapping[str, Any], deny: list[str], syn_rate: int) -> list[Network]:
    """Write a server's starting policy into its freshly loaded maps; returns the denied networks."""
    abi = _abi()
    networks = [parse_cidr(text) for text in deny]
    if networks:
        deny_list = DenyList(maps, abi)
        for network in networks:
            deny_list.add(network)
    if syn_rate:
        set_syn_rate(maps, syn_rate, abi)
    return networks


# --- per-client figures -----------------------------------------------------------------------

@dataclass(frozen=True)
class ClientFigures:
    addr: str
    connections: int  # SYNs let through
    requests: int  # segments that start with an HTTP method (retransmissions included)
    bytes: int  # IP bytes received from the client
    dropped: int  # SYNs dropped by the rate limit
    last_seen: float  # seconds ago
    first_seen: float  # seconds ago (since the entry started afresh)


def client_address(family: int, raw: bytes) -> str:
    if family == 6:
        return str(ipaddress.IPv6Address(raw[:16]))
    return str(ipaddress.IPv4Address(raw[:4]))


def read_clients(client_map: Any, abi: Any | None = None, *, limit: int = 1 << 17,
                 now_ns: int | None = None) -> list[ClientFigures]:
    """Live entries of client_stats (at most `limit` walked), most requests first.

    Entries idle longer than FS_CLIENT_IDLE_NS are left out: the program starts them afresh.
    bpf_ktime_get_ns() is CLOCK_MONOTONIC, like time.monotonic_ns().
    """
    abi = abi or _abi()
    idle_ns = abi.const("FS_CLIENT_IDLE_NS")
    now_ns = time.monotonic_ns() if now_ns is None else now_ns
    found = []
    for n, key in enumerate(client_map):
        if n >= limit:
            break
        try:
            value = client_map[key]
        except KeyError:
            continue
        k, v = abi.unpack("struct fs_client_key", key), abi.unpack("struct fs_client", value)
        if now_ns - v["last_seen_ns"] > idle_ns:
            continue
        found.append(ClientFigures(
            addr=client_address(k["family"], k["addr"]), connections=v["connections"],
            requests=v["requests"], bytes=v["bytes"], dropped=v["dropped"],
            last_seen=max(now_ns - v["last_seen_ns"], 0) / NS_PER_S,
            first_seen=max(now_ns - v["first_seen_ns"], 0) / NS_PER_S))
    found.sort(key=lambda c: (-c.requests, -c.connections, -c.bytes, c.addr))
    return found


def top_clients(port: int, n: int = 5, *, limit: int = 1 << 17) -> list[ClientFigures]:
    """The `n` busiest clients of the server on `port`, read through its pinned client_stats.

    Raises PolicyMapsMissing when that server has no such map (older object, or -n).
    """
    from .libbpf import Map

    pin = config.pin_dir(port) / CLIENT_MAP
    try:
        m = Map.from_pin(pin)
    except FileNotFoundError:
        raise PolicyMapsMissing(f"no {CLIENT_MAP} pinned for port {port} ({pin})") from None
    with m:
        return read_clients(m, limit=limit)[:n]
