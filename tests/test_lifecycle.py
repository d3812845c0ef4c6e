"""fileserver_ctl.kernel: attach, count traffic, detach, and recover from a crashed run.

Programs go on the host end of a veth pair whose peer sits in a namespace of the test's own
(traffic is sent from there); "nothing remains" is checked by querying the kernel.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from fileserver_ctl import config, kernel, libbpf
from fileserver_ctl.config import Settings
from fileserver_ctl.kernel import KernelPath, ServerRunningError
from fileserver_ctl.libbpf import Abi, XdpAttachMode
from servers import start_fsctl

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parent.parent

# A server's kernel side alone, in another process: ready line, then wait for a signal.
CHILD = """
import sys, time
from fileserver_ctl.config import Settings
from fileserver_ctl.kernel import KernelPath
settings = Settings(interface=sys.argv[1], port=int(sys.argv[2]))
with KernelPath(settings, bpf_object=sys.argv[3]) as kp:
    print("ready", kp.attachment.xdp_mode, flush=True)
    time.sleep(60)
"""


# The same, with a forked process (as a server's worker) that outlives it by a few seconds.
FORKING_CHILD = """
import os, sys, time
from fileserver_ctl.config import Settings
from fileserver_ctl.kernel import KernelPath
settings = Settings(interface=sys.argv[1], port=int(sys.argv[2]))
with KernelPath(settings, bpf_object=sys.argv[3]) as kp:
    r, w = os.pipe()
    worker = os.fork()
    if worker == 0:
        os.write(w, b"x")  # the at-fork handlers (which drop the links) have run
        time.sleep(5)
        os._exit(0)
    os.read(r, 1)  # crashing before would race them: not the case tested
    print("ready", worker, flush=True)
    time.sleep(60)
"""


@contextmanager
def kernel_child(interface: str, port: int, bpf_object: Path, *, prefix: tuple[str, ...] = (),
                 script: str = CHILD) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen([*prefix, sys.executable, "-c", script, interface, str(port), str(bpf_object)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("ready"):
            proc.kill()
            pytest.fail(f"child did not attach: {line}{proc.communicate(timeout=10)[1]}")
        proc.ready_line = line  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def crash(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def assert_nothing_attached(interface: str, port: int, *, xdp: bool = True) -> None:
    ifindex = socket.if_nametoindex(interface)
    assert libbpf.tc_query(ifindex, kernel.tc_handle(port), kernel.TC_PRIORITY) is None
    tc_shown = subprocess.run(["tc", "filter", "show", "dev", interface, "ingress"],
                              capture_output=True, text=True).stdout
    assert f"handle {kernel.tc_handle(port):#x} " not in tc_shown
    if xdp:
        assert libbpf.xdp_query(ifindex).prog_id == 0
        net = subprocess.run(["bpftool", "net", "show", "dev", interface], capture_output=True, text=True)
        assert "fileserver" not in net.stdout
    assert not config.pin_dir(port).exists()
    assert not kernel.state_path(port).exists()


def clsact_on(interface: str) -> bool:
    shown = subprocess.run(["tc", "qdisc", "show", "dev", interface], capture_output=True, text=True)
    return "qdisc clsact " in shown.stdout


def stat_index(name: str) -> int:
    return Abi(config.ABI_HEADER).enum("fs_stat")[name]


def counter(kp: KernelPath, name: str) -> int:
    values = kp.maps["stats"][struct.pack("=I", stat_index(name))]
    return sum(struct.unpack("=Q", v)[0] for v in values)


def test_attach_counts_traffic_and_detaches(real_bpf_object: Path, veth, free_port: int) -> None:
    settings = Settings(interface=veth.host_if, port=free_port)
    with socket.create_server((veth.host_addr, free_port)):
        with KernelPath(settings, bpf_object=real_bpf_object) as kp:
            att = kp.attachment
            assert att.interface == veth.host_if and att.tc_prog_id
            assert att.xdp_mode == "native"  # veth has native XDP
            assert libbpf.tc_query(veth.host_ifindex, free_port, kernel.TC_PRIORITY) == att.tc_prog_id
            assert libbpf.xdp_query(veth.host_ifindex).attach_mode == XdpAttachMode.DRV
            assert {"stats", "file_cache", "conn_track", "events"} <= set(os.listdir(config.pin_dir(free_port)))
            before = counter(kp, "FS_STAT_PACKETS"), counter(kp, "FS_STAT_XDP_PACKETS")
            veth.run_in([sys.executable, "-c",
                         "import socket, sys; s = socket.create_connection((sys.argv[1], int(sys.argv[2])), 3);"
                         "s.sendall(b'GET / HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n'); s.close()",
                         veth.host_addr, str(free_port)])
            after = counter(kp, "FS_STAT_PACKETS"), counter(kp, "FS_STAT_XDP_PACKETS")
            assert after[0] > before[0] and after[1] > before[1]
            with libbpf.Map.from_pin(config.pin_dir(free_port) / "stats") as pinned:  # as `fsctl stats` reads
                assert pinned[struct.pack("=I", stat_index("FS_STAT_PACKETS"))] == \
                    kp.maps["stats"][struct.pack("=I", stat_index("FS_STAT_PACKETS"))]
    assert_nothing_attached(veth.host_if, free_port)
    assert "clsact" not in subprocess.run(["tc", "qdisc", "show", "dev", veth.host_if],
                                          capture_output=True, text=True).stdout


def test_lo_gets_generic_xdp(real_bpf_object: Path, free_port: int) -> None:
    with KernelPath(Settings(interface="lo", port=free_port), bpf_object=real_bpf_object) as kp:
        if kp.attachment.xdp_mode is None and "already runs" in kp.attachment.xdp_problem:
            pytest.skip(f"another server holds XDP on lo: {kp.attachment.xdp_problem}")
        assert kp.attachment.xdp_mode == "generic"
    assert_nothing_attached("lo", free_port, xdp=False)


def test_crashed_run_is_cleaned_by_next_start(real_bpf_object: Path, veth, free_port: int) -> None:
    with kernel_child(veth.host_if, free_port, real_bpf_object) as child:
        crash(child)
    # What a SIGKILL leaves: the TC filter, the pins, the state file. XDP went with the link.
    assert libbpf.tc_query(veth.host_ifindex, free_port, kernel.TC_PRIORITY)
    assert (config.pin_dir(free_port) / "stats").exists()
    assert libbpf.xdp_query(veth.host_ifindex).prog_id == 0
    with KernelPath(Settings(interface=veth.host_if, port=free_port), bpf_object=real_bpf_object) as kp:
        assert f"TC filter on {veth.host_if}" in kp.attachment.removed_leftovers
        assert kp.attachment.tc_prog_id
    assert_nothing_attached(veth.host_if, free_port)


def test_forked_process_holds_neither_links_nor_the_run_lock(real_bpf_object: Path, veth, free_port: int) -> None:
    """A worker that outlives its SIGKILLed server by a moment (it is told to stop, and takes a
    while) must not keep XDP attached nor the port looking alive: the next start would fail
    with "already running" until it is gone."""
    with kernel_child(veth.host_if, free_port, real_bpf_object, script=FORKING_CHILD) as child:
        worker = int(child.ready_line.split()[1])
        crash(child)
    try:
        os.kill(worker, 0)  # still there
        assert libbpf.xdp_query(veth.host_ifindex).prog_id == 0  # the link went with the server
        assert f"TC filter on {veth.host_if}" in kernel.remove_leftovers(free_port)  # not EBUSY
        assert_nothing_attached(veth.host_if, free_port)
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_start_sweeps_crashed_runs_of_other_ports(real_bpf_object: Path, veth, free_port: int) -> None:
    other = free_port + 1 if free_port < 18999 else free_port - 1
    with kernel_child(veth.host_if, other, real_bpf_object) as child:
        crash(child)
    assert libbpf.tc_query(veth.host_ifindex, other, kernel.TC_PRIORITY)
    with KernelPath(Settings(interface=veth.host_if, port=free_port), bpf_object=real_bpf_object) as kp:
        assert f"TC filter on {veth.host_if} (port {other})" in kp.attachment.removed_leftovers
        assert_nothing_attached(veth.host_if, other, xdp=False)
    assert_nothing_attached(veth.host_if, free_port)
    assert not clsact_on(veth.host_if)  # the crashed run had created it; the last server removed it


def test_remove_leftovers_undoes_a_crashed_run(real_bpf_object: Path, veth, free_port: int) -> None:
    with kernel_child(veth.host_if, free_port, real_bpf_object) as child:
        crash(child)
    removed = kernel.remove_leftovers(free_port)
    assert f"TC filter on {veth.host_if}" in removed
    assert f"clsact qdisc on {veth.host_if}" in removed  # the crashed run had created it
    assert any(item.startswith("pin ") for item in removed)
    assert_nothing_attached(veth.host_if, free_port)
    assert kernel.remove_leftovers(free_port) == []  # nothing left the second time


def test_leftovers_found_by_name_without_a_record(real_bpf_object: Path, veth, free_port: int) -> None:
    with kernel_child(veth.host_if, free_port, real_bpf_object) as child:
        crash(child)
    kernel.state_path(free_port).unlink()  # every interface is searched
    removed = kernel.remove_leftovers(free_port)
    assert f"TC filter on {veth.host_if}" in removed
    # the interface's marker, not the run's record, says a server created the qdisc
    assert f"clsact qdisc on {veth.host_if}" in removed
    assert_nothing_attached(veth.host_if, free_port)
    assert not clsact_on(veth.host_if)


def test_live_server_is_left_alone(real_bpf_object: Path, veth, free_port: int) -> None:
    with kernel_child(veth.host_if, free_port, real_bpf_object) as child:
        with pytest.raises(ServerRunningError, match=f"pid {child.pid}"):
            kernel.remove_leftovers(free_port)
        with pytest.raises(ServerRunningError) as exc:
            KernelPath(Settings(interface=veth.host_if, port=free_port), bpf_object=real_bpf_object).start()
        assert exc.value.errno == errno.EBUSY
        assert libbpf.tc_query(veth.host_ifindex, free_port, kernel.TC_PRIORITY)  # still attached
        child.send_signal(signal.SIGINT)  # KeyboardInterrupt: the child detaches on its way out
        assert child.wait(timeout=10) != 0
    assert_nothing_attached(veth.host_if, free_port)


def test_second_port_on_same_interface(real_bpf_object: Path, veth, free_port: int) -> None:
    other = free_port + 1 if free_port < 18999 else free_port - 1
    with KernelPath(Settings(interface=veth.host_if, port=free_port), bpf_object=real_bpf_object) as first:
        with KernelPath(Settings(interface=veth.host_if, port=other), bpf_object=real_bpf_object) as second:
            assert first.attachment.xdp_mode == "native"
            assert second.attachment.xdp_mode is None and "already runs XDP" in second.attachment.xdp_problem
            assert libbpf.tc_query(veth.host_ifindex, other, kernel.TC_PRIORITY) == second.attachment.tc_prog_id
        assert_nothing_attached(veth.host_if, other, xdp=False)
        assert libbpf.tc_query(veth.host_ifindex, free_port, kernel.TC_PRIORITY)  # untouched
    assert_nothing_attached(veth.host_if, free_port)


def test_clsact_goes_with_the_last_server_whichever_created_it(real_bpf_object: Path, veth,
                                                               free_port: int) -> None:
    """The qdisc's creator leaves first, while another server's filter still holds it; the other
    removes it when it leaves. (Each run removed only a qdisc it had created itself: this order
    left an empty clsact behind, as a full test run did on lo.)"""
    other = free_port + 1 if free_port < 18999 else free_port - 1
    marker = kernel.clsact_marker(veth.host_ifindex, veth.host_if)
    first = KernelPath(Settings(interface=veth.host_if, port=free_port), bpf_object=real_bpf_object)
    first.start()
    try:
        with KernelPath(Settings(interface=veth.host_if, port=other), bpf_object=real_bpf_object) as second:
            assert marker.exists()
            first.close()
            assert clsact_on(veth.host_if) and marker.exists()  # held by the second's filter
            assert libbpf.tc_query(veth.host_ifindex, other, kernel.TC_PRIORITY) == second.attachment.tc_prog_id
    finally:
        first.close()
    assert_nothing_attached(veth.host_if, free_port)
    assert_nothing_attached(veth.host_if, other)
    assert not clsact_on(veth.host_if) and not marker.exists()


def test_someone_elses_clsact_is_left_alone(real_bpf_object: Path, veth, free_port: int) -> None:
    libbpf.tc_hook_create(veth.host_ifindex)  # there before any server: not ours to remove
    try:
        with KernelPath(Settings(interface=veth.host_if, port=free_port), bpf_object=real_bpf_object):
            assert not kernel.clsact_marker(veth.host_ifindex, veth.host_if).exists()
        assert_nothing_attached(veth.host_if, free_port)
        assert clsact_on(veth.host_if)
    finally:
        libbpf.tc_hook_destroy(veth.host_ifindex)


def connect_from_peer(veth, port: int) -> None:
    with socket.create_server((veth.host_addr, port)):
        veth.run_in([sys.executable, "-c",
                     "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3).close()",
                     veth.host_addr, str(port)])


def test_each_server_on_an_interface_sees_its_own_port(real_bpf_object: Path, veth, free_port: int) -> None:
    other = free_port + 1 if free_port < 18999 else free_port - 1
    with KernelPath(Settings(interface=veth.host_if, port=free_port), bpf_object=real_bpf_object) as first, \
            KernelPath(Settings(interface=veth.host_if, port=other), bpf_object=real_bpf_object) as second:
        for port, kp in ((free_port, first), (other, second)):
            before = counter(kp, "FS_STAT_PACKETS")
            connect_from_peer(veth, port)
            assert counter(kp, "FS_STAT_PACKETS") > before, f"server of port {port} saw none of its packets"


def test_unknown_interface_and_missing_object(real_bpf_object: Path, tmp_path: Path, free_port: int) -> None:
    with pytest.raises(OSError) as exc:
        KernelPath(Settings(interface="nosuchif0", port=free_port), bpf_object=real_bpf_object).start()
    assert exc.value.errno == errno.ENODEV and "nosuchif0" in str(exc.value)
    with pytest.raises(OSError) as exc:
        KernelPath(Settings(interface="lo", port=free_port), bpf_object=tmp_path / "none.o").start()
    assert exc.value.errno == errno.ENOENT and "make -C bpf" in str(exc.value)
    assert not kernel.state_path(free_port).exists()


SYNCOOKIES_CHILD = """
import sys
from pathlib import Path
from fileserver_ctl.config import Settings
from fileserver_ctl.kernel import KernelPath
knob = Path("/proc/sys/net/ipv4/tcp_syncookies")
knob.write_text("0")
with KernelPath(Settings(interface="lo", port=int(sys.argv[1])), bpf_object=sys.argv[2]):
    during = knob.read_text().strip()
print(during, knob.read_text().strip())
"""


def test_syncookies_switched_on_and_restored(real_bpf_object: Path, veth, free_port: int) -> None:
    # In the test's namespace, whose tcp_syncookies is its own: the host's is never touched.
    out = veth.run_in([sys.executable, "-c", SYNCOOKIES_CHILD, str(free_port), str(real_bpf_object)],
                      capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.stdout.split() == ["1", "0"], out.stderr


def _own_link_ids() -> set[int]:
    """BPF links this process holds (fdinfo names a link's id): other servers on this machine
    attach the same tracepoints meanwhile."""
    ids = set()
    for info in Path("/proc/self/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue  # an fd closed while we looked
        ids.update(int(line.split()[1]) for line in text.splitlines() if line.startswith("link_id:"))
    return ids


def _tracepoint_links() -> list[str]:
    shown = subprocess.run(["bpftool", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    own = _own_link_ids()
    return [link.get("tp_name", "") for link in json.loads(shown or "[]")
            if link.get("type") == "raw_tracepoint" and link.get("id") in own]


@pytest.mark.skipif(not kernel.kernel_has_tracepoints(list(kernel.COHERENCE_PROGRAMS.values())),
                    reason="this kernel has no inode ctime tracepoints (< 6.13)")
def test_coherence_tracepoints_attached_while_running(real_bpf_object: Path, free_port: int) -> None:
    before = _tracepoint_links()
    with KernelPath(Settings(interface="lo", port=free_port), bpf_object=real_bpf_object) as kp:
        assert kp.coherence_tracepoints
        during = _tracepoint_links()
        for tracepoint in kernel.COHERENCE_PROGRAMS.values():
            assert during.count(tracepoint) == before.count(tracepoint) + 1
    assert _tracepoint_links() == before


def test_missing_tracepoints_are_detected() -> None:
    assert not kernel.kernel_has_tracepoints(["no_such_tracepoint_anywhere"])


def test_dead_runs_cache_figures_are_swept(free_port: int) -> None:
    """A run that died leaves /run/fileserver/<port>.cache.json: the next start deletes it."""
    figures = kernel.RUN_ROOT / f"{free_port}.cache.json"
    figures.parent.mkdir(parents=True, exist_ok=True)
    figures.write_text('{"pid": 0, "files": 1}')
    kernel.remove_dead_runs()
    assert not figures.exists()
    assert not kernel.state_path(free_port).exists()  # the lock taken to check is gone too


def _our_filters_on_lo(port: int) -> list[dict]:
    shown = subprocess.run(["tc", "-j", "filter", "show", "dev", "lo", "ingress"], capture_output=True,
                           text=True, timeout=10).stdout
    return [f for f in json.loads(shown or "[]")
            if f.get("pref") == kernel.TC_PRIORITY and f.get("options", {}).get("handle") == hex(port)]


def _wrk(url: str, seconds: int) -> subprocess.Popen:
    return subprocess.Popen(["wrk", "-t2", "-c20", f"-d{seconds}s", "--timeout", "2s", url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_fsctl_up_killed_under_load_then_up_again(real_bpf_object: Path, tmp_path: Path, free_port: int) -> None:
    """SIGKILL of `fsctl up` while wrk loads it on lo, then `fsctl up` again: it starts without
    an error, removes the dead run's filter (one filter of the port, its own), answers, and
    leaves nothing when stopped."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk not installed")
    (tmp_path / "f1k.bin").write_bytes(os.urandom(1024))
    args = ["-p", str(free_port), "-d", str(tmp_path), "-i", "lo", "--workers", "2"]
    url = f"http://127.0.0.1:{free_port}/f1k.bin"
    first = start_fsctl(args, free_port)
    load = _wrk(url, 3)
    try:
        time.sleep(1)
        first.proc.kill()
        first.proc.wait(timeout=10)
    finally:
        load.communicate(timeout=30)
    # (its filter stays for the next start, unless a start on another port sweeps it first)
    assert len(_our_filters_on_lo(free_port)) <= 1
    deadline = time.monotonic() + 10  # its workers die with it: the port is free again
    while time.monotonic() < deadline and subprocess.run(
            ["ss", "-Htln", f"sport = :{free_port}"], capture_output=True, text=True).stdout.strip():
        time.sleep(0.1)
    second = start_fsctl(args, free_port)
    try:
        assert not any("rror" in line for line in second.output), second.output
        filters = _our_filters_on_lo(free_port)
        assert len(filters) == 1 and filters[0]["options"]["prog"]["name"] == "fileserver_ingr", filters
        out = _wrk(url, 1).communicate(timeout=30)[0]
        assert int(re.search(r"(\d+) requests in", out).group(1)) > 100, out
        assert "Socket errors" not in out and "Non-2xx" not in out, out
    finally:
        assert second.stop() == 0
    assert_nothing_attached("lo", free_port, xdp=False)


def test_session_check_reports_only_what_the_session_left() -> None:
    from conftest import Attached, left_behind

    empty = Attached(frozenset(), False, False, False, False, frozenset(), frozenset())
    left = Attached(frozenset({18001, 18002}), True, False, True, True, frozenset({18001}), frozenset({18001}))
    assert left_behind(empty, left, live={18002}) == [
        "TC filter of port 18001 on lo", "pins of port 18001", "run state of port 18001"]
    bare = Attached(frozenset(), True, True, False, True, frozenset(), frozenset())
    assert left_behind(empty, bare, live=set()) == [
        "an empty clsact qdisc on lo", f"an empty {config.PIN_ROOT}"]
    assert left_behind(bare, bare, live=set()) == []  # there before the session


def test_a_device_gone_during_the_leftover_search_is_skipped(free_port: int, monkeypatch) -> None:
    """Devices come and go (a test's veth, a container's): one that vanishes between the listing
    and the query (ENODEV) holds nothing of ours any more, and must not stop a start."""
    gone = 2 ** 30  # no device has this index
    real = kernel._interfaces_to_search
    monkeypatch.setattr(kernel, "_interfaces_to_search",
                        lambda state: [(gone, "gone0"), *real(state)])
    with pytest.raises(OSError) as exc:
        libbpf.tc_query(gone, kernel.tc_handle(free_port), kernel.TC_PRIORITY)
    assert exc.value.errno == errno.ENODEV
    assert kernel.remove_leftovers(free_port) == []


def test_a_signal_right_after_the_qdisc_is_made_leaves_it_ours_to_remove(veth, monkeypatch) -> None:
    """Python raises a Ctrl-C at any bytecode: one just after tc_hook_create() returned must not
    leave a clsact qdisc that no marker names as ours (it would stay for good)."""
    create = libbpf.tc_hook_create

    def create_then_interrupted(ifindex: int) -> bool:
        create(ifindex)
        raise KeyboardInterrupt

    monkeypatch.setattr(libbpf, "tc_hook_create", create_then_interrupted)
    with pytest.raises(KeyboardInterrupt), kernel._shared_lock():
        kernel._create_clsact(veth.host_ifindex, veth.host_if)
    assert clsact_on(veth.host_if)
    with kernel._shared_lock():
        assert kernel._release_clsact(veth.host_ifindex, veth.host_if)
    assert not clsact_on(veth.host_if)
    assert not kernel.clsact_marker(veth.host_ifindex, veth.host_if).exists()
