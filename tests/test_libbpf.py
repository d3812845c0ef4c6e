"""fileserver_ctl.libbpf against the real kernel, with the small object from conftest."""

from __future__ import annotations

import errno
import logging
import os
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import CLANG
from fileserver_ctl import libbpf
from fileserver_ctl.libbpf import (Abi, BpfObject, MapType, RingBuffer, TcAttachPoint, UpdateFlags,
                                   XdpAttachMode, XdpFlags)

pytestmark = pytest.mark.bpf

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
ETH_IPV4_PACKET = bytes(12) + b"\x08\x00" + bytes(50)


def key(n: int) -> bytes:
    return U32.pack(n)


@pytest.fixture
def obj(test_bpf_object: Path):
    with BpfObject.open(test_bpf_object) as o:
        o.load()
        yield o


def test_open_load_lists_programs_and_maps(obj: BpfObject) -> None:
    assert [p.name for p in obj.programs()] == ["fileserver_ingress", "fileserver_xdp"]
    maps = obj.maps()
    assert {"stats", "table", "recent", "events"} <= set(maps)
    stats = maps["stats"]
    assert (stats.type, stats.key_size, stats.value_size, stats.max_entries) == (MapType.PERCPU_ARRAY, 4, 8, 2)
    assert obj.map("recent").type == MapType.LRU_HASH
    assert obj.map("events").type == MapType.RINGBUF
    assert obj.program("fileserver_xdp").fd > 0


def test_missing_file_names_call_and_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as exc:
        BpfObject.open(tmp_path / "absent.o")
    assert exc.value.errno == errno.ENOENT
    assert "bpf_object__open_file" in str(exc.value) and "absent.o" in str(exc.value)


def test_unknown_program_and_map_raise_enoent(obj: BpfObject) -> None:
    with pytest.raises(OSError) as exc:
        obj.program("nope")
    assert exc.value.errno == errno.ENOENT
    with pytest.raises(OSError) as exc:
        obj.map("nope")
    assert exc.value.errno == errno.ENOENT


def test_rodata_is_set_before_load(test_bpf_object: Path) -> None:
    with BpfObject.open(test_bpf_object) as o:
        assert o.rodata_vars() == {"magic": (0, 4), "server_port": (4, 2)}
        o.set_rodata("magic", U32.pack(7))
        with pytest.raises(ValueError):
            o.set_rodata("magic", b"\x01")
        with pytest.raises(OSError) as exc:
            o.set_rodata("no_such_var", b"\x00")
        assert exc.value.errno == errno.ENOENT
        o.load()
        with pytest.raises(OSError) as exc:
            o.set_rodata("magic", U32.pack(1))
        assert exc.value.errno == errno.EBUSY
        run = libbpf.prog_test_run(o.program("fileserver_ingress").fd, ETH_IPV4_PACKET)
        assert run.retval == 7
        assert run.data_out == ETH_IPV4_PACKET


def test_percpu_array_counts_every_run(obj: BpfObject) -> None:
    stats = obj.map("stats")
    libbpf.prog_test_run(obj.program("fileserver_ingress").fd, ETH_IPV4_PACKET, repeat=5)
    per_cpu = stats[key(0)]
    assert isinstance(per_cpu, list) and len(per_cpu) == libbpf.num_possible_cpus()
    assert sum(U64.unpack(v)[0] for v in per_cpu) == 5
    stats[key(1)] = [U64.pack(cpu + 10) for cpu in range(libbpf.num_possible_cpus())]
    assert [U64.unpack(v)[0] for v in stats[key(1)]] == [cpu + 10 for cpu in range(libbpf.num_possible_cpus())]
    stats[key(1)] = U64.pack(3)  # one value is written to every CPU
    assert {U64.unpack(v)[0] for v in stats[key(1)]} == {3}
    assert list(stats) == [key(0), key(1)]
    with pytest.raises(OSError) as exc:
        stats[key(2)] = U64.pack(0)
    assert exc.value.errno == errno.E2BIG


def test_hash_map_is_a_mutable_mapping(obj: BpfObject) -> None:
    table = obj.map("table")
    assert len(table) == 0 and dict(table) == {}
    table[key(1)] = U64.pack(11)
    table.update({key(2): U64.pack(22)})
    assert dict(table) == {key(1): U64.pack(11), key(2): U64.pack(22)}
    assert key(1) in table and key(3) not in table
    with pytest.raises(OSError) as exc:
        table.update(key(1), U64.pack(0), UpdateFlags.NOEXIST)
    assert exc.value.errno == errno.EEXIST and "bpf_map_update_elem(table)" in str(exc.value)
    with pytest.raises(OSError) as exc:
        table.update(key(9), U64.pack(0), UpdateFlags.EXIST)
    assert exc.value.errno == errno.ENOENT
    del table[key(1)]
    with pytest.raises(KeyError):
        table[key(1)]
    with pytest.raises(KeyError):
        del table[key(1)]
    with pytest.raises(ValueError):
        table[b"\x00"] = U64.pack(1)
    with pytest.raises(ValueError):
        table[key(5)] = b"short"
    for n in range(16):
        table[key(n)] = U64.pack(n)
    with pytest.raises(OSError) as exc:
        table[key(99)] = U64.pack(0)
    assert exc.value.errno == errno.E2BIG
    assert table.pop(key(3)) == U64.pack(3) and len(table) == 15


def test_lru_hash_evicts_instead_of_failing(obj: BpfObject) -> None:
    recent = obj.map("recent")
    for n in range(40):
        recent[key(n)] = U32.pack(n)
    assert 0 < len(recent) <= 40
    assert recent[key(39)] == U32.pack(39)
    assert key(0) not in recent


def test_ring_buffer_delivers_records_and_callback_errors(test_bpf_object: Path) -> None:
    with BpfObject.open(test_bpf_object) as o:
        o.set_rodata("magic", U32.pack(100))
        o.set_rodata("server_port", struct.pack("<H", 18080))
        o.load()
        prog = o.program("fileserver_ingress")
        records: list[bytes] = []
        with RingBuffer(o.map("events"), records.append) as ring:
            assert ring.poll(0) == 0
            libbpf.prog_test_run(prog.fd, ETH_IPV4_PACKET, repeat=2)
            assert ring.poll(100) == 2
            assert records == [struct.pack("<II", 18180, len(ETH_IPV4_PACKET))] * 2

        def broken(data: bytes) -> None:
            raise RuntimeError("callback failed")

        with RingBuffer(o.map("events"), broken) as ring:
            libbpf.prog_test_run(prog.fd, ETH_IPV4_PACKET)
            with pytest.raises(RuntimeError, match="callback failed"):
                ring.poll(100)


def test_pin_and_open_from_pin(obj: BpfObject, bpffs: Path) -> None:
    pin_dir = bpffs / f"fileserver-test-{os.getpid()}"
    pin_dir.mkdir()
    try:
        obj.map("table")[key(4)] = U64.pack(44)
        obj.map("table").pin(pin_dir / "table")
        obj.map("stats").pin(pin_dir / "stats")
        with libbpf.Map.from_pin(pin_dir / "table") as table:
            assert (table.name, table.type, table.key_size, table.value_size) == ("table", MapType.HASH, 4, 8)
            assert table[key(4)] == U64.pack(44)
            table[key(5)] = U64.pack(55)
        assert obj.map("table")[key(5)] == U64.pack(55)
        with libbpf.Map.from_pin(pin_dir / "stats") as stats:
            assert len(stats[key(0)]) == libbpf.num_possible_cpus()
        with pytest.raises(OSError) as exc:
            obj.map("table").pin(pin_dir / "table")
        assert exc.value.errno == errno.EEXIST
    finally:
        for pin in pin_dir.iterdir():
            libbpf.unpin(pin)
        pin_dir.rmdir()
    with pytest.raises(OSError) as exc:
        libbpf.Map.from_pin(pin_dir / "table")
    assert exc.value.errno == errno.ENOENT and "bpf_obj_get" in str(exc.value)


def test_tc_attach_query_detach(obj: BpfObject, veth, caplog: pytest.LogCaptureFixture) -> None:
    ifindex = veth.host_ifindex
    prog = obj.program("fileserver_ingress")
    caplog.set_level(logging.INFO, logger="fileserver.libbpf")
    assert libbpf.tc_query(ifindex, 7, 7) is None  # no clsact yet
    assert libbpf.tc_hook_create(ifindex) is True
    assert libbpf.tc_query(ifindex, 7, 7) is None  # clsact, no filter
    # "none there" is the answer asked for: libbpf's kernel message about it is no warning
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    try:
        assert libbpf.tc_hook_create(ifindex) is False
        filt = libbpf.tc_attach(ifindex, prog.fd, handle=7, priority=7)
        assert (filt.handle, filt.priority) == (7, 7)
        assert libbpf.tc_query(ifindex, 7, 7) == filt.prog_id
        assert libbpf.prog_info(filt.prog_id).name == libbpf.kernel_name("fileserver_ingress") == "fileserver_ingr"
        with pytest.raises(OSError) as exc:
            libbpf.tc_attach(ifindex, prog.fd, handle=7, priority=7)
        assert exc.value.errno == errno.EEXIST and "bpf_tc_attach" in str(exc.value)
        libbpf.tc_attach(ifindex, prog.fd, handle=7, priority=7, replace=True)
        shown = subprocess.run(["tc", "filter", "show", "dev", veth.host_if, "ingress"],
                               capture_output=True, text=True, check=True).stdout
        assert "name fileserver_ingr " in shown
        libbpf.tc_detach(ifindex, 7, 7)
        assert libbpf.tc_query(ifindex, 7, 7) is None
        with pytest.raises(OSError) as exc:
            libbpf.tc_detach(ifindex, 7, 7)
        assert exc.value.errno == errno.ENOENT
    finally:
        libbpf.tc_hook_destroy(ifindex, TcAttachPoint.INGRESS | TcAttachPoint.EGRESS)
    assert "clsact" not in subprocess.run(["tc", "qdisc", "show", "dev", veth.host_if],
                                          capture_output=True, text=True).stdout


def test_xdp_link_detaches_on_destroy(obj: BpfObject, veth) -> None:
    ifindex = veth.host_ifindex
    prog = obj.program("fileserver_xdp")
    link = libbpf.xdp_link_create(prog.fd, ifindex, XdpFlags.SKB_MODE)
    try:
        info = libbpf.xdp_query(ifindex)
        assert info.attach_mode == XdpAttachMode.SKB and info.skb_prog_id == info.prog_id != 0
        assert libbpf.prog_info(info.prog_id).name == libbpf.kernel_name("fileserver_xdp") == "fileserver_xdp"
        with pytest.raises(OSError) as exc:  # a link cannot be replaced by netlink
            libbpf.xdp_detach(ifindex, XdpFlags.SKB_MODE)
        assert exc.value.errno == errno.EBUSY
    finally:
        link.destroy()
    assert libbpf.xdp_query(ifindex).prog_id == 0
    native = prog.attach_xdp(ifindex)  # veth has native XDP
    try:
        assert libbpf.xdp_query(ifindex).attach_mode == XdpAttachMode.DRV
    finally:
        native.destroy()
    assert libbpf.xdp_query(ifindex).prog_id == 0


def test_xdp_netlink_attach_and_detach(obj: BpfObject, veth) -> None:
    ifindex = veth.host_ifindex
    libbpf.xdp_attach(ifindex, obj.program("fileserver_xdp").fd, XdpFlags.SKB_MODE)
    try:
        assert libbpf.xdp_query(ifindex).attach_mode == XdpAttachMode.SKB
        with pytest.raises(OSError) as exc:
            libbpf.xdp_attach(ifindex, obj.program("fileserver_xdp").fd,
                              XdpFlags.SKB_MODE | XdpFlags.UPDATE_IF_NOEXIST)
        assert exc.value.errno in (errno.EEXIST, errno.EBUSY)
    finally:
        libbpf.xdp_detach(ifindex, XdpFlags.SKB_MODE)
    assert libbpf.xdp_query(ifindex) == (0, 0, 0, 0, XdpAttachMode.NONE)


def test_xdp_native_on_lo_is_refused(obj: BpfObject) -> None:
    if libbpf.xdp_query(1).prog_id:
        pytest.skip("lo runs an XDP program already (a server is up)")
    with pytest.raises(OSError) as exc:
        libbpf.xdp_link_create(obj.program("fileserver_xdp").fd, 1, XdpFlags.DRV_MODE)
    assert exc.value.errno == errno.EOPNOTSUPP


def test_test_run_on_bad_fd_raises_ebadf() -> None:
    with pytest.raises(OSError) as exc:
        libbpf.prog_test_run(987654, ETH_IPV4_PACKET)
    assert exc.value.errno == errno.EBADF and "bpf_prog_test_run_opts" in str(exc.value)


REJECTED_SOURCE = r"""
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("xdp")
int unchecked(struct xdp_md *ctx)
{
	return *(unsigned char *)(long)ctx->data;	/* no bounds check: the verifier refuses */
}

char LICENSE[] SEC("license") = "GPL";
"""


def test_verifier_rejection_carries_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if CLANG is None:
        pytest.skip("clang-16 not installed")
    (tmp_path / "bad.bpf.c").write_text(REJECTED_SOURCE)
    arch_include = f"/usr/include/{os.uname().machine}-linux-gnu"
    subprocess.run([CLANG, "-g", "-O2", "-target", "bpf", f"-I{arch_include}", "-c",
                    str(tmp_path / "bad.bpf.c"), "-o", str(tmp_path / "bad.bpf.o")], check=True, timeout=60)
    with caplog.at_level(logging.DEBUG, logger="fileserver.libbpf"), BpfObject.open(tmp_path / "bad.bpf.o") as o:
        with pytest.raises(OSError) as exc:
            o.load()
    assert exc.value.errno == errno.EACCES
    assert exc.value.strerror.startswith(f"bpf_object__load({tmp_path / 'bad.bpf.o'}): Permission denied")
    assert "invalid access to packet" in str(exc.value)  # the verifier's own words
    assert any(r.name == "fileserver.libbpf" and r.levelno == logging.DEBUG for r in caplog.records)
    assert any("invalid access to packet" in r.getMessage() for r in caplog.records)


ABI_HEADER = """/* test ABI */
#ifndef __TEST_ABI_H
#define __TEST_ABI_H

#define MAX_PATH 64
#define FLAG_GZIP 0x2

enum fs_stat {
	FS_STAT_KERNEL_RESPONSES,
	FS_STAT_HANDOFFS,
	FS_STAT_MAX,
};

struct cache_key {
	__u8 path[MAX_PATH];
};

struct cache_value {
	__u32 len;
	__u16 flags;
	__u16 pad;
	__u64 mtime;
	struct { __u32 a; __u32 b; } inner;
	__u32 parts[2];
};

#endif /* __TEST_ABI_H */
"""


def test_abi_reads_the_shared_header(tmp_path: Path) -> None:
    (tmp_path / "abi.h").write_text(ABI_HEADER)
    abi = Abi(tmp_path / "abi.h")
    assert abi.enum("fs_stat") == {"FS_STAT_KERNEL_RESPONSES": 0, "FS_STAT_HANDOFFS": 1, "FS_STAT_MAX": 2}
    assert abi.const("MAX_PATH") == 64 and abi.const("FLAG_GZIP") == 2
    with pytest.raises(KeyError):
        abi.const("NOPE")
    assert abi.sizeof("struct cache_key") == 64 and abi.sizeof("struct cache_value") == 32
    raw = abi.pack("struct cache_value", {"len": 5, "flags": 2, "mtime": 1 << 40,
                                          "inner": {"b": 9}, "parts": [1, 2]})
    assert raw == struct.pack("<IHHQIIII", 5, 2, 0, 1 << 40, 0, 9, 1, 2)
    assert abi.unpack("struct cache_value", raw) == {"len": 5, "flags": 2, "pad": 0, "mtime": 1 << 40,
                                                     "inner": {"a": 0, "b": 9}, "parts": [1, 2]}
    key_bytes = abi.pack("struct cache_key", {"path": b"/index.html"})
    assert key_bytes == b"/index.html".ljust(64, b"\0")
    assert abi.unpack("struct cache_key", key_bytes)["path"] == key_bytes
    with pytest.raises(KeyError):
        abi.pack("struct cache_value", {"nope": 1})
    with pytest.raises(ValueError):
        abi.pack("struct cache_key", {"path": b"x" * 65})
    with pytest.raises(ValueError):
        abi.unpack("struct cache_value", b"short")


def test_abi_rejects_what_cffi_cannot_parse(tmp_path: Path) -> None:
    (tmp_path / "bad.h").write_text("#define TWICE(x) ((x) * 2)\nstruct s { size_t n; int *p };\n")
    with pytest.raises(ValueError, match="bad.h"):
        Abi(tmp_path / "bad.h")


def test_real_abi_header_parses_if_present() -> None:
    from fileserver_ctl import config

    if not config.ABI_HEADER.exists():
        pytest.skip(f"{config.ABI_HEADER} not written yet")
    stats = Abi(config.ABI_HEADER).enum("fs_stat")
    assert list(stats)[-1] == "FS_STAT_MAX" and stats["FS_STAT_MAX"] == len(stats) - 1


def test_probe_fentry_loads_or_says_why() -> None:
    try:
        libbpf.probe_fentry("tcp_v4_rcv")
    except OSError as exc:  # refused on kernels locked down for integrity (this VM)
        assert exc.errno == errno.EPERM and "bpf_prog_load(fentry/tcp_v4_rcv)" in str(exc)
    with pytest.raises(OSError) as exc:
        libbpf.probe_fentry("no_such_kernel_function")
    assert exc.value.errno == errno.ENOENT
