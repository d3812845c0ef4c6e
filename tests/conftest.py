"""Shared fixtures: a small BPF object compiled from C here, bpffs, a veth pair in its own
network namespace, free ports in 18000-18999. Tests marked `bpf` skip with the reason when this
machine cannot load BPF. At the end of the session nothing of ours may stay on lo, in bpffs or
in /run/fileserver that was not there at its start and that no live server holds."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

from fileserver_ctl import config, kernel
from servers import pick_port

# A stand-in with the real object's program names and the map kinds the binding handles:
# stats[0] counts TC packets, stats[1] XDP packets; the TC program reports (magic + server_port,
# skb->len) on the ring buffer and returns `magic` as its verdict.
TEST_BPF_SOURCE = r"""
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct event { __u32 magic; __u32 len; };

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} table SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32);
} recent SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

const volatile __u32 magic = 0;
const volatile __u16 server_port = 0;

static void count(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &slot);

	if (n)
		__sync_fetch_and_add(n, 1);
}

SEC("tc")
int fileserver_ingress(struct __sk_buff *skb)
{
	struct event *e;

	count(0);
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (e) {
		e->magic = magic + server_port;
		e->len = skb->len;
		bpf_ringbuf_submit(e, 0);
	}
	return magic;
}

SEC("xdp")
int fileserver_xdp(struct xdp_md *ctx)
{
	count(1);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "GPL";
"""

CLANG = shutil.which("clang-16") or shutil.which("clang")


@cache
def bpf_unavailable() -> str | None:
    """Why BPF cannot be used here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (BPF load and attach)"
    try:
        from fileserver_ctl import libbpf

        libbpf.num_possible_cpus()
    except OSError as exc:
        return f"libbpf unavailable: {exc}"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "kernel has no BTF (/sys/kernel/btf/vmlinux)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = bpf_unavailable()
    if reason:
        for item in items:
            if "bpf" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def test_bpf_object(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TEST_BPF_SOURCE compiled with clang-16 (skips when no clang)."""
    if CLANG is None:
        pytest.skip("clang-16 not installed")
    out = tmp_path_factory.mktemp("bpf")
    source = out / "test.bpf.c"
    source.write_text(TEST_BPF_SOURCE)
    arch_include = f"/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run([CLANG, "-g", "-O2", "-target", "bpf", "-mcpu=v3", f"-I{arch_include}",
                    "-c", str(source), "-o", str(out / "test.bpf.o")], check=True, timeout=60)
    return out / "test.bpf.o"


@pytest.fixture(scope="session")
def real_bpf_object() -> Path:
    """bpf/fileserver.bpf.o as `make -C bpf` builds it (skips when not built)."""
    if not config.BPF_OBJECT.exists():
        pytest.skip(f"{config.BPF_OBJECT} not built (run: make -C bpf)")
    return config.BPF_OBJECT


@pytest.fixture
def bpffs() -> Path:
    """/sys/fs/bpf, mounted if it was not."""
    root = Path("/sys/fs/bpf")
    if subprocess.run(["mountpoint", "-q", str(root)]).returncode != 0:
        subprocess.run(["mount", "-t", "bpf", "bpf", str(root)], check=True, timeout=10)
    return root


@pytest.fixture
def veth() -> Iterator:
    """A veth pair: host end here, peer end in a network namespace of its own."""
    from fileserver_ctl.netns import veth_pair

    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) not installed")
    with veth_pair() as pair:
        yield pair


@pytest.fixture
def free_port() -> int:
    """A TCP port in 18000-18999 nobody listens on, picked at random to avoid other runs."""
    return pick_port()


# --- nothing left behind -----------------------------------------------------------------

@dataclass(frozen=True)
class Attached:
    """What servers put on lo, in bpffs and in /run/fileserver, as seen at one moment."""

    filter_ports: frozenset[int]  # handles of our TC filters on lo ingress
    clsact: bool  # a clsact qdisc on lo
    clsact_empty: bool  # ... without any filter
    xdp: bool  # fileserver_xdp on lo
    pin_root: bool  # config.PIN_ROOT exists
    pin_ports: frozenset[int]
    state_ports: frozenset[int]  # /run/fileserver/<port>.kernel.json


def _tc_json(*args: str) -> list[dict]:
    out = subprocess.run(["tc", "-j", *args], capture_output=True, text=True, timeout=10).stdout
    return json.loads(out or "[]")


def attached_now() -> Attached:
    ingress = _tc_json("filter", "show", "dev", "lo", "ingress")
    egress = _tc_json("filter", "show", "dev", "lo", "egress")
    link = json.loads(subprocess.run(["ip", "-j", "link", "show", "lo"], capture_output=True,
                                     text=True, timeout=10).stdout)[0]
    ports = {int(f["options"]["handle"], 16) for f in ingress
             if f.get("pref") == kernel.TC_PRIORITY and "handle" in f.get("options", {})}
    clsact = any(q.get("kind") == "clsact" for q in _tc_json("qdisc", "show", "dev", "lo"))
    root = config.PIN_ROOT
    return Attached(
        filter_ports=frozenset(ports), clsact=clsact, clsact_empty=clsact and not ingress and not egress,
        xdp=link.get("xdp", {}).get("prog", {}).get("name") == kernel.XDP_PROGRAM,
        pin_root=root.is_dir(),
        pin_ports=frozenset(int(p.name) for p in root.glob("*") if p.name.isdigit()) if root.is_dir() else frozenset(),
        state_ports=frozenset(int(p.name.split(".")[0]) for p in kernel.RUN_ROOT.glob("*.kernel.json")
                              if p.name.split(".")[0].isdigit()))


def live_ports() -> set[int]:
    """Ports whose server holds its state file's flock now: read from /proc/locks, so that the
    check never takes a lock a starting server (of another run, say) wants."""
    locked = {int(m.group(1)) for m in re.finditer(r"FLOCK\s+\S+\s+\S+\s+\d+\s+[0-9a-f]+:[0-9a-f]+:(\d+)",
                                                   Path("/proc/locks").read_text())}
    live = set()
    for path in kernel.RUN_ROOT.glob("*.kernel.json"):
        try:
            if path.stat().st_ino in locked:
                live.add(int(path.name.split(".")[0]))
        except (OSError, ValueError):
            pass
    return live


def left_behind(before: Attached, after: Attached, live: set[int]) -> list[str]:
    """What `after` holds that `before` did not and no live server explains."""
    found = [f"TC filter of port {p} on lo" for p in sorted(after.filter_ports - before.filter_ports - live)]
    found += [f"pins of port {p}" for p in sorted(after.pin_ports - before.pin_ports - live)]
    found += [f"run state of port {p}" for p in sorted(after.state_ports - before.state_ports - live)]
    if after.clsact_empty and not before.clsact:
        found.append("an empty clsact qdisc on lo")
    if after.xdp and not before.xdp and not live:
        found.append("fileserver_xdp on lo")
    if after.pin_root and not before.pin_root and not after.pin_ports:
        found.append(f"an empty {config.PIN_ROOT}")
    return found


@pytest.fixture(scope="session", autouse=True)
def nothing_left_attached() -> Iterator[None]:
    """Fails the session's last test (as an error at its teardown) when the suite left anything."""
    if bpf_unavailable() or shutil.which("tc") is None:
        yield
        return
    with kernel._shared_lock():
        before = attached_now()
    yield
    with kernel._shared_lock():  # no server of ours is half-way through attaching or leaving
        after, live = attached_now(), live_ports()
    leftovers = left_behind(before, after, live)
    assert not leftovers, f"the test session left behind: {', '.join(leftovers)}"
