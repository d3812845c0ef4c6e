"""The fast path on a real (non-loopback) device: `fsctl up -i <veth>` with clients in a namespace.

A veth pair joins the root namespace (server, programs on the host end) to a namespace of the
test's own (clients, run there as a subprocess). Checked on that device: cached GETs answered by
the kernel path with the right bytes (counters say which path answered), MSS from the device's
MTU and hand-off of answers larger than one segment, the XDP deny list and SYN rate limit, the
per-client figures, checksums when the device does not complete them, and that nothing stays
attached after the server exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fileserver_ctl import config, kernel, libbpf, policy
from fileserver_ctl.libbpf import Abi
from fileserver_ctl.netns import VethPair, veth_pair
from servers import pick_port

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parent.parent
PORTS = range(18600, 18700)
STARTUP_TIMEOUT = 30.0
RNG = random.Random(8)
FILES = {
    "small.txt": b"hello over a veth\n" * 5,
    "k1.bin": RNG.randbytes(1024),
    "k1100.bin": RNG.randbytes(1100),  # head + body still under one 1448-byte segment
    "k1400.bin": RNG.randbytes(1400),  # head + body over one segment: two segments from the kernel
    "k10.bin": RNG.randbytes(10_000),  # many segments, ACK-clocked from the kernel
    "k100.bin": RNG.randbytes(100_000),  # past the initial window: the kernel keeps sending on ACKs
    "k300.bin": RNG.randbytes(300_000),  # over the cache's per-file limit (256 KiB): user space
}
KERNEL_FILES = ("small.txt", "k1.bin", "k1100.bin")
SHA = {f"/{name}": hashlib.sha256(data).hexdigest() for name, data in FILES.items()}

# Runs inside the namespace: one JSON job on stdin, one JSON result on stdout. Every socket has
# a timeout, so a job ends however the server behaves.
TESTS = Path(__file__).resolve().parent  # CLIENT's working directory: `import wire`
CLIENT = r'''
import hashlib, json, select, socket, sys, time
from concurrent.futures import ThreadPoolExecutor
from wire import connect, read_answer

def session(job, s):
    results = []
    try:
        sock = connect(s["host"], job["port"], job["timeout"], job.get("mss", 0))
    except OSError as e:
        return [{"error": f"connect: {e}"}]
    with sock:
        buf = b""
        for path, close in s["requests"]:
            started = time.monotonic()
            req = f"GET {path} HTTP/1.1\r\nHost: veth\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
            try:
                sock.sendall(req.encode())
                _, status, _, body, buf = read_answer(sock, buf)
                if close and sock.recv(1):
                    raise ConnectionError("bytes after a Connection: close response")
            except (OSError, ValueError) as e:
                results.append({"path": path, "error": f"{type(e).__name__}: {e}"})
                return results
            results.append({"path": path, "status": status, "length": len(body),
                            "sha256": hashlib.sha256(body).hexdigest(),
                            "seconds": round(time.monotonic() - started, 3)})
            if close:
                break
    return results

def burst(job):
    """count non-blocking connects at once; how many completed within wait seconds."""
    socks = []
    for _ in range(job["count"]):
        s = socket.socket(socket.AF_INET6 if ":" in job["host"] else socket.AF_INET)
        s.setblocking(False)
        s.connect_ex((job["host"], job["port"]))
        socks.append(s)
    deadline = time.monotonic() + job["wait"]
    done = set()
    while time.monotonic() < deadline and len(done) < len(socks):
        _, ready, _ = select.select([], [s for s in socks if s not in done], [], 0.05)
        done.update(ready)
    established = sum(1 for s in done if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0)
    for s in socks:
        s.close()
    return {"established": established}

def mss(job):
    with socket.create_connection((job["host"], job["port"]), timeout=job["timeout"]) as s:
        return {"mss": s.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)}

job = json.load(sys.stdin)
if job["mode"] == "sessions":
    with ThreadPoolExecutor(job.get("workers", 1)) as pool:
        out = list(pool.map(lambda s: session(job, s), job["sessions"]))
elif job["mode"] == "burst":
    out = burst(job)
else:
    out = mss(job)
json.dump(out, sys.stdout)
'''


# --- the namespace ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    """A veth pair with IPv4 and IPv6 on both ends."""

    pair: VethPair
    host6: str
    peer6: str

    def addr(self, family: int, side: str = "host") -> str:
        if family == 6:
            return self.host6 if side == "host" else self.peer6
        return self.pair.host_addr if side == "host" else self.pair.peer_addr

    def client(self, job: dict, timeout: float = 60) -> object:
        """Run CLIENT with `job` inside the namespace; its JSON result."""
        done = self.pair.run_in([sys.executable, "-c", CLIENT], input=json.dumps(job), capture_output=True,
                                text=True, timeout=timeout, check=False, cwd=TESTS)  # CLIENT imports wire
        assert done.returncode == 0, f"client failed: {done.stderr[-2000:]}"
        return json.loads(done.stdout)

    def sessions(self, family: int, port: int, sessions: list[list[tuple[str, bool]]], *,
                 workers: int = 1, timeout: float = 5.0, run_timeout: float = 60,
                 mss: int = 0) -> list[list[dict]]:
        host = self.addr(family)
        return self.client({"mode": "sessions", "port": port, "timeout": timeout, "workers": workers, "mss": mss,
                            "sessions": [{"host": host, "requests": s} for s in sessions]},
                           timeout=run_timeout)  # type: ignore[return-value]

    def can_connect(self, family: int, port: int, timeout: float = 1.5) -> bool:
        return self.client({"mode": "burst", "host": self.addr(family), "port": port, "count": 1,
                            "wait": timeout})["established"] == 1  # type: ignore[index]


@contextmanager
def link() -> Iterator[Link]:
    with veth_pair() as pair:
        net = pair.host_addr.split(".")
        prefix = f"fd42:213:{int(net[2]):x}:{int(net[3]):x}"
        host6, peer6 = f"{prefix}::1", f"{prefix}::2"
        for argv in (["ip", "addr", "add", f"{host6}/64", "dev", pair.host_if, "nodad"],
                     ["ip", "-n", pair.netns, "addr", "add", f"{peer6}/64", "dev", pair.peer_if, "nodad"]):
            subprocess.run(argv, check=True, capture_output=True, timeout=10)
        yield Link(pair, host6, peer6)


# `ethtool -K IFACE FEATURE on|off` (ethtool is not installed here): SIOCETHTOOL, legacy set commands
ETHTOOL_SET = {"tx": 0x17, "tso": 0x1F, "gso": 0x24}  # ETHTOOL_STXCSUM, ETHTOOL_STSO, ETHTOOL_SGSO
ETHTOOL = r'''
import array, fcntl, socket, struct, sys
request = array.array("I", [int(sys.argv[2]), int(sys.argv[3])])
ifreq = struct.pack("16sP", sys.argv[1].encode(), request.buffer_info()[0]) + bytes(16)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    fcntl.ioctl(s.fileno(), 0x8946, ifreq)
'''


def set_offload(lk: Link, side: str, feature: str, on: bool) -> None:
    """ethtool -K <one end> tx|tso|gso on|off."""
    args = [sys.executable, "-c", ETHTOOL, lk.pair.host_if if side == "host" else lk.pair.peer_if,
            str(ETHTOOL_SET[feature]), str(int(on))]
    if side == "host":
        subprocess.run(args, check=True, timeout=10)
    else:
        lk.pair.run_in(args)


def no_offloads(lk: Link) -> None:
    """veth carries a TSO/GSO skb whole: segment on send, so that a drop is one segment's loss."""
    for side in ("host", "peer"):
        for feature in ("tso", "gso"):
            set_offload(lk, side, feature, False)


@contextmanager
def lossy_link(loss: str) -> Iterator[Link]:
    """A link whose namespace drops `loss` of the packets each way (iptables statistic: this
    kernel has no netem), offloads off so that a drop is one segment's loss."""
    if shutil.which("iptables") is None:
        pytest.skip("iptables not installed (this kernel has no netem to drop packets with)")
    with link() as lk:
        no_offloads(lk)
        for chain in ("INPUT", "OUTPUT"):
            for iptables in ("iptables", "ip6tables"):
                done = lk.pair.run_in([iptables, "-A", chain, "-m", "statistic", "--mode", "random",
                                       "--probability", loss, "-j", "DROP"], capture_output=True,
                                      text=True, check=False)
                if done.returncode != 0:
                    pytest.skip(f"{iptables} in a namespace failed: {done.stderr.strip()}")
        yield lk


# --- the server -------------------------------------------------------------------------------

@dataclass
class Running:
    port: int
    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)  # everything fsctl printed so far

    def counters(self) -> dict[str, int]:
        names = stat_names()
        with libbpf.Map.from_pin(config.pin_dir(self.port) / "stats") as stats:
            return {name: sum(int.from_bytes(v[:8], "little") for v in stats[i.to_bytes(4, "little")])
                    for i, name in names.items()}

    def fsctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fileserver_ctl", *args, "-p", str(self.port)],
                              capture_output=True, text=True, timeout=30, cwd=REPO, env=fsctl_env())


def stat_names() -> dict[int, str]:
    return {v: k.removeprefix("FS_STAT_").lower()
            for k, v in Abi(config.ABI_HEADER).enum("fs_stat").items() if k != "FS_STAT_MAX"}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def handoffs(moved: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in moved.items() if k.startswith("handoff_")}


def fsctl_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


@contextmanager
def fsctl_up(where: Link | str, docroot: Path, *args: str) -> Iterator[Running]:
    """`fsctl up -i <host end | interface>` until the block ends; SIGTERM then, SIGKILL + `fsctl down`
    if stuck."""
    port = pick_port(PORTS)
    interface = where if isinstance(where, str) else where.pair.host_if
    proc = subprocess.Popen([sys.executable, "-m", "fileserver_ctl", "up", "-i", interface, "-p", str(port),
                             "-d", str(docroot), "--workers", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=fsctl_env())
    running = Running(port, proc)
    ready = threading.Event()
    listening = f"File server listening on port {port}"

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            running.lines.append(line.rstrip("\n"))
            if line.startswith(listening):
                ready.set()
        ready.set()  # EOF: fsctl exited

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(STARTUP_TIMEOUT) or listening not in running.lines:
            pytest.fail(f"fsctl up did not get ready: {running.lines}")
        yield running
    finally:
        stop(running)


def stop(running: Running) -> None:
    proc = running.proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    if proc.returncode not in (0, -signal.SIGTERM):
        subprocess.run([sys.executable, "-m", "fileserver_ctl", "down", "-p", str(running.port)],
                       capture_output=True, timeout=30, cwd=REPO, env=fsctl_env())


def assert_nothing_attached(lk: Link, port: int) -> None:
    ifindex = lk.pair.host_ifindex
    assert libbpf.tc_query(ifindex, kernel.tc_handle(port), kernel.TC_PRIORITY) is None
    assert libbpf.xdp_query(ifindex).prog_id == 0
    assert "fileserver" not in subprocess.run(["bpftool", "net", "show", "dev", lk.pair.host_if],
                                              capture_output=True, text=True, timeout=10).stdout
    assert not config.pin_dir(port).exists()
    assert not kernel.state_path(port).exists()


def check_bytes(results: list[list[dict]], expected_sessions: list[list[tuple[str, bool]]]) -> None:
    """Every request answered 200 with the file's exact bytes, in order."""
    assert len(results) == len(expected_sessions)
    for got, asked in zip(results, expected_sessions):
        assert [r.get("error") for r in got if "error" in r] == []
        assert [(r["path"], r["status"], r["sha256"]) for r in got] == [(p, 200, SHA[p]) for p, _ in asked]


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("veth-www")
    for name, data in FILES.items():
        (root / name).write_bytes(data)
    return root


@pytest.fixture(scope="module")
def lk() -> Iterator[Link]:
    with link() as created:
        yield created


@pytest.fixture(scope="module")
def served(lk: Link, docroot: Path, real_bpf_object: Path) -> Iterator[Running]:
    with fsctl_up(lk, docroot) as running:
        yield running


@pytest.fixture
def own_lk() -> Iterator[Link]:
    """A link of the test's own: one XDP program per device, and `served` holds the shared one."""
    with link() as created:
        yield created


FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


# --- the kernel path on the device --------------------------------------------------------------

def test_attached_natively_with_the_device_mss(served: Running, lk: Link) -> None:
    assert f"Successfully attached XDP program to {lk.pair.host_if} (native mode)" in served.lines
    # MTU 1500: the SYN-ACK offers 1460 (IPv4) / 1440 (IPv6); the client takes 12 for timestamps
    assert lk.client({"mode": "mss", "host": lk.addr(4), "port": served.port, "timeout": 5}) == {"mss": 1448}
    assert lk.client({"mode": "mss", "host": lk.addr(6), "port": served.port, "timeout": 5}) == {"mss": 1428}


@FAMILIES
def test_cached_gets_answered_by_the_kernel(served: Running, lk: Link, family: int) -> None:
    keep_alive = [(f"/{name}", False) for name in (*KERNEL_FILES, "small.txt")]
    sessions = [keep_alive, keep_alive, [("/k1.bin", True)], [("/k1100.bin", True)]]
    before = served.counters()
    results = lk.sessions(family, served.port, sessions)
    moved = delta(before, served.counters())
    check_bytes(results, sessions)
    requests = sum(len(s) for s in sessions)
    assert moved.get("responses") == requests
    assert handoffs(moved) == {}
    assert moved.get("closed", 0) >= 2  # both Connection: close answers ended with a clean close
    assert moved.get(f"xdp_ipv{family}", 0) > 0 and moved.get("xdp_to_port", 0) > 0
    assert moved.get("xdp_drop_deny", 0) == moved.get("xdp_drop_syn_rate", 0) == 0


@FAMILIES
def test_answers_over_one_segment_come_from_the_kernel(served: Running, lk: Link, family: int) -> None:
    sessions = [[("/k1400.bin", False), ("/k10.bin", False), ("/k100.bin", False)],
                [("/k10.bin", True)], [("/k100.bin", True)], [("/k300.bin", True)]]
    before = served.counters()
    results = lk.sessions(family, served.port, sessions)
    moved = delta(before, served.counters())
    check_bytes(results, sessions)
    assert moved.get("responses", 0) == 5
    # at MSS 1448/1428: 1 + 7 + 70 + 7 + 70 data segments at the least
    assert moved.get("segments", 0) >= 155
    # only the file over the per-file limit goes to user space
    assert handoffs(moved) == {"handoff_miss": 1}


@FAMILIES
def test_the_client_mss_bounds_kernel_answers(served: Running, lk: Link, family: int) -> None:
    """A client offering a small MSS (IPv4's 536, IPv6's 1220 minimum) gets every answer from the
    kernel in segments no larger than that MSS: the 1 KiB file and its head take two or more."""
    sessions = [[("/small.txt", False), ("/small.txt", True)], [("/k1.bin", True)]]
    before = served.counters()
    results = lk.sessions(family, served.port, sessions, mss=536 if family == 4 else 1220)
    moved = delta(before, served.counters())
    check_bytes(results, sessions)
    assert moved.get("responses") == 3
    assert moved.get("segments", 0) >= 4
    assert handoffs(moved) == {}


def test_hit_hit_miss_hit_on_one_connection(served: Running, lk: Link) -> None:
    sessions = [[("/small.txt", False), ("/k1.bin", False), ("/k300.bin", False), ("/small.txt", False),
                 ("/k1100.bin", True)]]
    before = served.counters()
    results = lk.sessions(4, served.port, sessions)
    moved = delta(before, served.counters())
    check_bytes(results, sessions)
    assert moved.get("responses") == 2  # after the hand-off the kernel socket answers the rest
    assert handoffs(moved) == {"handoff_miss": 1}


def test_per_client_figures(served: Running, lk: Link) -> None:
    sessions = [[("/small.txt", False)] * 3, [("/k100.bin", True)]]
    before = {c.addr: c for c in policy.top_clients(served.port, 100)}
    check_bytes(lk.sessions(4, served.port, sessions), sessions)
    after = {c.addr: c for c in policy.top_clients(served.port, 100)}
    peer = lk.addr(4, "peer")
    old = before.get(peer)
    new = after[peer]
    assert new.connections - (old.connections if old else 0) == 2
    assert new.requests - (old.requests if old else 0) == 4
    assert new.bytes - (old.bytes if old else 0) > 4 * 60  # request segments at least
    assert new.last_seen < 5


# --- policy on the device -----------------------------------------------------------------------

def test_deny_list_at_start_and_while_running(own_lk: Link, docroot: Path, real_bpf_object: Path) -> None:
    lk = own_lk
    peer4, peer6 = lk.addr(4, "peer"), lk.addr(6, "peer")
    with fsctl_up(lk, docroot, "--deny", peer4, "--deny", f"{peer6}/128") as srv:
        assert f"Deny list: {peer4}/32, {peer6}/128" in srv.lines
        assert not lk.can_connect(4, srv.port)
        assert not lk.can_connect(6, srv.port)
        moved = srv.counters()
        assert moved["xdp_drop_deny"] >= 2
        # only the server's port is touched: another port still gets through
        with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as other:
            assert lk.can_connect(4, other.getsockname()[1])
            assert lk.can_connect(6, other.getsockname()[1])

        listed = srv.fsctl("deny")
        assert listed.returncode == 0
        rows = {line.split()[0]: int(line.split()[1]) for line in listed.stdout.splitlines()}
        assert set(rows) == {f"{peer4}/32", f"{peer6}/128"} and min(rows.values()) >= 1

        allowed = srv.fsctl("allow", peer4)
        assert (allowed.returncode, allowed.stdout.strip()) == (0, f"Allowed {peer4}/32 on port {srv.port}")
        sessions = [[("/small.txt", False), ("/k100.bin", True)]]
        check_bytes(lk.sessions(4, srv.port, sessions), sessions)
        assert not lk.can_connect(6, srv.port)

        subnet = f"{peer4.rsplit('.', 1)[0]}.0/24"
        denied = srv.fsctl("deny", subnet)
        assert (denied.returncode, denied.stdout.strip()) == (0, f"Denied {subnet} on port {srv.port}")
        assert not lk.can_connect(4, srv.port)
        again = srv.fsctl("deny", subnet)
        assert (again.returncode, again.stdout.strip()) == (0, f"{subnet} was already denied on port {srv.port}")
        missing = srv.fsctl("allow", peer4)
        assert missing.returncode == 1
        assert missing.stderr.strip() == (f"fsctl: error: {peer4}/32 is not in the deny list of port {srv.port} "
                                          f"(list it: fsctl deny -p {srv.port})")
        assert srv.fsctl("allow", subnet).returncode == 0
        assert srv.fsctl("allow", f"{peer6}/128").returncode == 0
        assert lk.can_connect(6, srv.port) and lk.can_connect(4, srv.port)
        assert srv.fsctl("deny").stdout.strip() == f"Deny list of port {srv.port} is empty"
    assert_nothing_attached(lk, srv.port)


def test_syn_rate_limit(own_lk: Link, docroot: Path, real_bpf_object: Path) -> None:
    lk = own_lk
    rate = 5
    with fsctl_up(lk, docroot, "--syn-rate", str(rate)) as srv:
        assert f"SYN rate limit: {rate} new connections per second per client" in srv.lines
        before = srv.counters()
        got = lk.client({"mode": "burst", "host": lk.addr(4), "port": srv.port, "count": 20, "wait": 0.4})
        moved = delta(before, srv.counters())
        # a full budget at once, then one more per 200 ms: at most 2 more within the 0.4 s waited
        assert rate <= got["established"] <= rate + 2
        assert moved.get("xdp_drop_syn_rate", 0) >= 20 - got["established"]
        (client,) = [c for c in policy.top_clients(srv.port, 100) if c.addr == lk.addr(4, "peer")]
        assert client.dropped == moved["xdp_drop_syn_rate"]
        time.sleep(1.1)  # the budget refills
        sessions = [[("/small.txt", True)]] * rate
        check_bytes(lk.sessions(4, srv.port, sessions, workers=rate), sessions)


def test_nothing_left_after_sigterm_or_sigkill(own_lk: Link, docroot: Path, real_bpf_object: Path) -> None:
    lk = own_lk
    with fsctl_up(lk, docroot) as srv:
        pass
    assert srv.proc.returncode == 0
    assert f"Detached kernel programs from {lk.pair.host_if}" in srv.lines
    assert_nothing_attached(lk, srv.port)

    with fsctl_up(lk, docroot) as srv:
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait(timeout=10)
        # the user-space workers die with their supervisor; wait for the port to be free
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and subprocess.run(
                ["ss", "-Htln", f"sport = :{srv.port}"], capture_output=True, text=True).stdout.strip():
            time.sleep(0.1)
        assert libbpf.xdp_query(lk.pair.host_ifindex).prog_id == 0  # the XDP link died with the process
        down = srv.fsctl("down")
        assert down.returncode == 0
        assert f"Removed leftover: TC filter on {lk.pair.host_if}" in down.stdout
    assert_nothing_attached(lk, srv.port)


# --- checksums the device does not complete --------------------------------------------------

def test_replies_survive_software_checksumming(docroot: Path, real_bpf_object: Path) -> None:
    with link() as lk2:
        set_offload(lk2, "host", "tx", False)
        with fsctl_up(lk2, docroot) as srv:
            sessions = [[("/small.txt", False), ("/k1.bin", True)]]
            results = lk2.sessions(4, srv.port, sessions, timeout=3)
            snmp = lk2.pair.run_in(["cat", "/proc/net/snmp"], capture_output=True, text=True).stdout
            tcp = [line.split() for line in snmp.splitlines() if line.startswith("Tcp:")]
            csum_errors = dict(zip(*tcp))["InCsumErrors"]
            assert all("error" not in r for s in results for r in s), f"client TCP InCsumErrors: {csum_errors}"
            check_bytes(results, sessions)
            assert srv.counters()["responses"] == 2


def test_fully_checksummed_requests(docroot: Path, real_bpf_object: Path) -> None:
    """The client's device does not offload (requests arrive CHECKSUM_NONE): answers are right."""
    with link() as lk2:
        set_offload(lk2, "peer", "tx", False)
        with fsctl_up(lk2, docroot) as srv:
            sessions = [[("/small.txt", False), ("/k1.bin", True)], [("/k10.bin", True)]]
            check_bytes(lk2.sessions(4, srv.port, sessions, timeout=3), sessions)
            moved = srv.counters()
            assert moved["responses"] == 3 and moved["handoff_too_large"] == 0
