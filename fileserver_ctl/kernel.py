"""Load, attach and detach the kernel fast path, and find what a crashed run left behind.

Everything one server changes in the kernel can be found again from its port alone:
- the TC filter sits on clsact ingress at handle = port, priority TC_PRIORITY;
- maps are pinned under config.pin_dir(port);
- XDP is held by a BPF link, so it goes away with the last process holding it;
- what else was changed (tcp_syncookies switched on) is recorded in
  /run/fileserver/<port>.kernel.json, which a running server keeps flock()ed: a lock that is free
  means its owner is gone, whatever way it died;
- the clsact qdisc is shared by every server on an interface: the one that created it leaves a
  marker (/run/fileserver/clsact.<ifindex>.<interface>), and whichever server leaves it without
  filters removes it. (Recorded per run, the creator could leave first while another server's
  filter held the qdisc, and the other, not its creator, left it behind.) One lock,
  /run/fileserver/shared.lock, covers creating the qdisc and attaching to it, detaching and
  removing it, and the pins' parent directory, which the last server removes too.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from . import config, libbpf
from .libbpf import BpfObject, Link, Map, XdpAttachMode, XdpFlags

log = logging.getLogger("fileserver.kernel")

TC_PROGRAM = "fileserver_ingress"
XDP_PROGRAM = "fileserver_xdp"
TC_PRIORITY = 0xF5  # tc filter preference of every server; the handle tells ports apart
BPFFS = Path("/sys/fs/bpf")
RUN_ROOT = Path("/run/fileserver")
SHARED_LOCK = RUN_ROOT / "shared.lock"
SYNCOOKIES = Path("/proc/sys/net/ipv4/tcp_syncookies")
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
# Tracepoints on inode ctime updates (kernel >= 6.13): the cache's synchronous invalidation.
COHERENCE_PROGRAMS = {"fileserver_ctime_set": "inode_set_ctime_to_ts",
                      "fileserver_ctime_xchg": "ctime_ns_xchg",
                      "fileserver_ctime_skip": "ctime_xchg_skip"}


def kernel_has_tracepoints(names: list[str]) -> bool:
    """Whether every tp_btf target exists: its btf_trace_<name> typedef is in the kernel's BTF."""
    try:
        btf = VMLINUX_BTF.read_bytes()
    except OSError:
        return False
    return all(b"\0btf_trace_" + name.encode() + b"\0" in btf for name in names)


class ServerRunningError(OSError):
    """Another live process owns this port's kernel state."""


def tc_handle(port: int) -> int:
    return port


def state_path(port: int) -> Path:
    return RUN_ROOT / f"{port}.kernel.json"


@dataclass
class RunState:
    """What a run changed beyond its pins and filter, so that a later start can undo it."""

    pid: int = 0
    interface: str = ""
    ifindex: int = 0
    created_clsact: bool = False  # read from older records; the interface's marker says it now
    syncookies_before: int | None = None  # the value to restore, None when left untouched


class _RunLock:
    """The port's state file, held with flock(LOCK_EX) while a server lives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.path = state_path(port)
        self._file: IO[str] | None = None

    def acquire(self) -> RunState | None:
        """Lock and return the previous run's state (None when there was none)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = _read_state(f.read()).pid
            f.close()
            owner = f" (pid {pid})" if pid else ""
            raise ServerRunningError(errno.EBUSY, f"a file server is already running on port "
                                     f"{self.port}{owner}; stop it with: fsctl down -p {self.port}") from None
        self._file = f
        f.seek(0)
        text = f.read()
        return _read_state(text) if text.strip() else None

    def save(self, state: RunState) -> None:
        assert self._file is not None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps(asdict(state)))
        self._file.flush()

    def release(self, *, remove: bool) -> None:
        if self._file is None:
            return
        if remove:
            self.path.unlink(missing_ok=True)
        self._file.close()  # drops the flock
        self._file = None


def run_state(port: int) -> RunState | None:
    """The record of the run on `port` (live or dead), None when there is none."""
    try:
        text = state_path(port).read_text()
    except OSError:
        return None
    return _read_state(text) if text.strip() else None


def _read_state(text: str) -> RunState:
    try:
        raw = json.loads(text)
        known = RunState.__dataclass_fields__
        return RunState(**{k: v for k, v in raw.items() if k in known})
    except (ValueError, TypeError):
        return RunState()


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf unless something is mounted there already."""
    if BPFFS.is_mount():
        return
    try:
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True, capture_output=True,
                       text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise OSError(errno.EPERM, f"mount -t bpf bpf {BPFFS}: {detail.strip()}") from None


def _read_syncookies() -> int | None:
    try:
        return int(SYNCOOKIES.read_text())
    except (OSError, ValueError):
        return None


def _write_syncookies(value: int) -> None:
    SYNCOOKIES.write_text(f"{value}\n")


def _clsact_in_use(interface: str) -> bool:
    """True when some filter (of anyone) is still on the interface's clsact hooks."""
    for direction in ("ingress", "egress"):
        shown = subprocess.run(["tc", "filter", "show", "dev", interface, direction],
                               capture_output=True, text=True, timeout=10)
        if shown.returncode != 0 or shown.stdout.strip():
            return True
    return False


def _remove_clsact(ifindex: int, interface: str) -> bool:
    """Remove the clsact qdisc if nothing else uses it; True when removed."""
    try:
        if _clsact_in_use(interface):
            return False
        libbpf.tc_hook_destroy(ifindex)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return False
        raise


def _remove_pin_dir(port: int) -> None:
    """Remove the port's (empty) pin directory, and its parent when no other server pins there."""
    pins = config.pin_dir(port)
    with _shared_lock():
        for directory in (pins, pins.parent):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    return
                raise


def clsact_marker(ifindex: int, interface: str) -> Path:
    """Present while the interface's clsact qdisc is one a server created."""
    return RUN_ROOT / f"clsact.{ifindex}.{interface}"


@contextmanager
def _shared_lock() -> Iterator[None]:
    """Serialises what servers share among them: creating, attaching to and removing clsact
    qdiscs (none removes a qdisc another has just found and is about to attach to), and making
    and removing the pins' parent directory."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(SHARED_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # held for a few netlink calls
        yield


def _create_clsact(ifindex: int, interface: str) -> bool:
    """Add the clsact qdisc (the caller holds _shared_lock); True when this call created it.

    The marker is written first: a signal between the qdisc's creation and the marker would
    leave a qdisc nobody knows to be ours. A marker without its qdisc is forgotten at release."""
    marker = clsact_marker(ifindex, interface)
    marked_here = not marker.exists()
    if marked_here:
        marker.write_text(f"{os.getpid()}\n")
    created = libbpf.tc_hook_create(ifindex)
    if not created and marked_here:
        marker.unlink(missing_ok=True)  # it was there before us: someone else's
    return created


def _release_clsact(ifindex: int, interface: str, *, created: bool = False) -> bool:
    """Remove the qdisc if a server created it (or `created`: an older record says so) and no
    filter is left on it; the caller holds _shared_lock. True when removed."""
    marker = clsact_marker(ifindex, interface)
    if not (created or marker.exists()):
        return False  # someone else's: left alone
    removed = _remove_clsact(ifindex, interface)
    if removed or not _clsact_exists(interface):
        marker.unlink(missing_ok=True)
    return removed


def _clsact_exists(interface: str) -> bool:
    shown = subprocess.run(["tc", "qdisc", "show", "dev", interface], capture_output=True, text=True,
                           timeout=10)
    return shown.returncode == 0 and "qdisc clsact " in shown.stdout


def probe_clsact(ifindex: int, interface: str) -> None:
    """Whether a clsact qdisc can be added (doctor): added and removed again when it was not
    there; raises OSError when it cannot."""
    with _shared_lock():
        if _create_clsact(ifindex, interface):
            _release_clsact(ifindex, interface)


def _sweep_clsact_markers() -> None:
    """Forget the markers of interfaces that are gone (a veth deleted under a server)."""
    for marker in RUN_ROOT.glob("clsact.*.*"):
        _, index, name = marker.name.split(".", 2)
        try:
            alive = index.isdigit() and socket.if_nametoindex(name) == int(index)
        except OSError:
            alive = False
        if not alive:
            marker.unlink(missing_ok=True)


def _is_ours(prog_id: int, name: str) -> bool:
    try:
        return libbpf.prog_info(prog_id).name == libbpf.kernel_name(name)
    except OSError:
        return False  # gone in the meantime


def _interfaces_to_search(state: RunState | None) -> list[tuple[int, str]]:
    """The interface the run recorded; every interface when there is no usable record."""
    if state is not None and state.interface:
        try:
            if socket.if_nametoindex(state.interface) == state.ifindex:
                return [(state.ifindex, state.interface)]
        except OSError:
            pass
    return socket.if_nameindex()


def _remove_unlocked(port: int, state: RunState | None) -> list[str]:
    """Undo what the run recorded in state and what its port identifies; the caller holds the lock."""
    removed: list[str] = []
    handle = tc_handle(port)
    recorded = (state.ifindex, state.interface) if state is not None and state.created_clsact else None
    for ifindex, name in _interfaces_to_search(state):
        try:
            removed += _remove_from_interface(ifindex, name, handle, created=recorded == (ifindex, name))
        except OSError as exc:
            if exc.errno != errno.ENODEV:
                raise  # ENODEV: the device went away while we looked, and all on it with it
    pins = config.pin_dir(port)
    if pins.is_dir():
        for pin in sorted(pins.iterdir()):
            libbpf.unpin(pin)
            removed.append(f"pin {pin}")
    _remove_pin_dir(port)
    if state is not None:
        if state.syncookies_before is not None and _read_syncookies() != state.syncookies_before:
            _write_syncookies(state.syncookies_before)
            removed.append(f"net.ipv4.tcp_syncookies restored to {state.syncookies_before}")
    # the cache's published figures (cache.state_path): nobody refreshes them any more
    (RUN_ROOT / f"{port}.cache.json").unlink(missing_ok=True)
    return removed


def _remove_from_interface(ifindex: int, name: str, handle: int, created: bool) -> list[str]:
    """Our TC filter, the clsact qdisc if nobody else uses it, our XDP program: those on one device."""
    removed: list[str] = []
    with _shared_lock():
        prog_id = libbpf.tc_query(ifindex, handle, TC_PRIORITY)
        if prog_id and _is_ours(prog_id, TC_PROGRAM):
            try:
                libbpf.tc_detach(ifindex, handle, TC_PRIORITY)
                removed.append(f"TC filter on {name}")
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
        if _release_clsact(ifindex, name, created=created):
            removed.append(f"clsact qdisc on {name}")
    xdp = libbpf.xdp_query(ifindex)
    if xdp.prog_id and _is_ours(xdp.prog_id, XDP_PROGRAM):
        mode = XdpFlags.SKB_MODE if xdp.attach_mode == XdpAttachMode.SKB else XdpFlags.DRV_MODE
        try:
            libbpf.xdp_detach(ifindex, mode)
            removed.append(f"XDP program on {name}")
        except OSError as exc:  # EBUSY: held by a link, i.e. by a live server
            if exc.errno not in (errno.EBUSY, errno.ENOENT, errno.EINVAL):
                raise
    return removed


def remove_leftovers(port: int) -> list[str]:
    """Remove what a dead server on `port` left in the kernel; returns what was removed.

    Raises ServerRunningError when a server on that port is still alive.
    """
    lock = _RunLock(port)
    state = lock.acquire()
    try:
        return _remove_unlocked(port, state)
    finally:
        lock.release(remove=True)


def remove_dead_runs(except_port: int | None = None) -> list[str]:
    """Remove the leftovers of every crashed server (any port), leaving live ones alone."""
    # Only runs that recorded a state file: pins alone may belong to a loader that is not fsctl.
    removed: list[str] = []
    with _shared_lock():
        _sweep_clsact_markers()
    ports = {int(p.name.split(".")[0]) for pattern in ("*.kernel.json", "*.cache.json")
             for p in RUN_ROOT.glob(pattern) if p.name.split(".")[0].isdigit()}
    for port in sorted(ports - {except_port}):
        try:
            removed += [f"{what} (port {port})" for what in remove_leftovers(port)]
        except ServerRunningError:
            continue
        except OSError as exc:
            log.warning("could not remove leftovers of port %d: %s", port, exc)
    return removed


@dataclass
class Attachment:
    """What KernelPath attached, for the messages the CLI prints."""

    interface: str
    ifindex: int
    tc_prog_id: int = 0
    xdp_mode: str | None = None  # "native" or "generic"; None when XDP is not attached
    xdp_problem: str = ""  # why not, when not
    removed_leftovers: list[str] = field(default_factory=list)


_RUNNING: weakref.WeakSet[KernelPath] = weakref.WeakSet()  # started in this process, not closed


def _disown_in_child() -> None:
    for kp in list(_RUNNING):
        kp._disown()


os.register_at_fork(after_in_child=_disown_in_child)


class KernelPath:
    """The fast path of one server: `with KernelPath(settings) as kp:` ... detached on exit."""

    def __init__(self, settings: config.Settings, *, bpf_object: Path | str = config.BPF_OBJECT) -> None:
        self.settings = settings
        self.bpf_object = Path(bpf_object)
        self.obj: BpfObject | None = None
        self.maps: dict[str, Map] = {}
        self.attachment: Attachment | None = None
        self._lock = _RunLock(settings.port)
        self._state = RunState()
        self._xdp_link: Link | None = None
        self._trace_links: list[Link] = []
        self._tracepoint_programs: list[str] = []
        self.coherence_tracepoints = False  # the ctime tracepoint programs are attached
        self._pinned: list[Path] = []
        self.denied: list[Any] = []  # networks of --deny, as written into the deny list

    def __enter__(self) -> KernelPath:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Attachment:
        port, interface = self.settings.port, self.settings.interface
        try:
            ifindex = socket.if_nametoindex(interface)
        except OSError:
            raise OSError(errno.ENODEV, f"unknown interface {interface!r}") from None
        if not self.bpf_object.exists():
            raise OSError(errno.ENOENT, f"{self.bpf_object} not built (run: make -C bpf)")
        ensure_bpffs()
        previous = self._lock.acquire()
        try:
            removed = _remove_unlocked(port, previous) + remove_dead_runs(except_port=port)
        except BaseException:  # keep the old record for the next attempt; none: no empty file
            self._lock.release(remove=previous is None)
            raise
        _RUNNING.add(self)
        try:
            for what in removed:
                log.info("removed leftover of an earlier run: %s", what)
            self.attachment = Attachment(interface, ifindex, removed_leftovers=removed)
            self._state = RunState(pid=os.getpid(), interface=interface, ifindex=ifindex)
            self._lock.save(self._state)
            self._load(port)
            self._pin_maps(port)
            self._apply_policy()
            self._enable_syncookies()
            self._attach_tc(ifindex)
            self._attach_xdp(ifindex)
            self._attach_tracepoints()
        except BaseException:
            self.close()
            raise
        return self.attachment

    def _load(self, port: int) -> None:
        self.obj = BpfObject.open(self.bpf_object)
        layout = self.obj.rodata_vars()
        if "server_port" in layout:
            self.obj.set_rodata("server_port", port.to_bytes(layout["server_port"][1], "little"))
        if "log_responses" in layout and self.settings.logs_requests:
            # the kernel reports its answers on `events` only when someone writes them to a log
            self.obj.set_rodata("log_responses", (1).to_bytes(layout["log_responses"][1], "little"))
        present = [p.name for p in self.obj.programs() if p.name in COHERENCE_PROGRAMS]
        if present and not kernel_has_tracepoints([COHERENCE_PROGRAMS[n] for n in present]):
            log.info("no inode ctime tracepoints in this kernel: cache coherence without them")
            for name in present:
                self.obj.program(name).set_autoload(False)
            present = []
        self._tracepoint_programs = present
        self.obj.load()
        # Not the internal ".rodata"/".bss" maps: nothing reads them, and bpffs refuses names with
        # a dot (reserved for the kernel's own maps.debug/progs.debug) anyway.
        self.maps = {name: m for name, m in self.obj.maps().items() if "." not in name}

    def _apply_policy(self) -> None:
        """--deny and --syn-rate go into the maps before anything is attached, so no packet
        slips through between the XDP attach and the policy write."""
        if self.settings.deny or self.settings.syn_rate:
            from . import policy

            self.denied = policy.apply(self.maps, self.settings.deny, self.settings.syn_rate)

    def _pin_maps(self, port: int) -> None:
        pins = config.pin_dir(port)
        with _shared_lock():  # the last server to leave removes the parent
            pins.mkdir(parents=True, exist_ok=True)
        for name, m in self.maps.items():
            m.pin(pins / name)
            self._pinned.append(pins / name)

    def _enable_syncookies(self) -> None:
        """The hand-off kfunc needs syncookies 1 or 2; at 0 the kernel answers with RST."""
        if _read_syncookies() == 0:
            self._state.syncookies_before = 0
            self._lock.save(self._state)
            _write_syncookies(1)
            log.info("net.ipv4.tcp_syncookies set to 1 (restored to 0 on exit)")

    def _attach_tc(self, ifindex: int) -> None:
        assert self.obj is not None and self.attachment is not None
        with _shared_lock():
            _create_clsact(ifindex, self.settings.interface)
            # replace=True: after the leftovers are gone nothing of ours sits there; should a
            # filter have appeared in between, taking its place beats failing with EEXIST.
            filt = libbpf.tc_attach(ifindex, self.obj.program(TC_PROGRAM).fd,
                                    handle=tc_handle(self.settings.port), priority=TC_PRIORITY, replace=True)
        self.attachment.tc_prog_id = filt.prog_id

    def _attach_xdp(self, ifindex: int) -> None:
        """Native XDP where the driver has it, else generic; not fatal: XDP only counts."""
        assert self.obj is not None and self.attachment is not None
        try:
            prog = self.obj.program(XDP_PROGRAM)
        except OSError:
            self.attachment.xdp_problem = f"{self.bpf_object.name} has no {XDP_PROGRAM} program"
            return
        holder = libbpf.xdp_query(ifindex).prog_id
        if holder:  # one XDP program per device: never displace someone else's
            try:
                name = libbpf.prog_info(holder).name
            except OSError:
                name = f"id {holder}"
            self.attachment.xdp_problem = f"{self.settings.interface} already runs XDP program {name}"
            log.info("XDP not attached: %s", self.attachment.xdp_problem)
            return
        try:
            self._xdp_link = prog.attach_xdp(ifindex)
        except OSError as native_error:
            try:
                self._xdp_link = libbpf.xdp_link_create(prog.fd, ifindex, XdpFlags.SKB_MODE)
            except OSError as exc:
                self.attachment.xdp_problem = (f"{native_error.strerror.splitlines()[0]}; "
                                               f"generic: {exc.strerror.splitlines()[0]}")
                log.info("XDP not attached: %s", self.attachment.xdp_problem)
                return
        mode = libbpf.xdp_query(ifindex).attach_mode
        self.attachment.xdp_mode = {XdpAttachMode.DRV: "native", XdpAttachMode.HW: "offloaded"}.get(mode, "generic")

    def _attach_tracepoints(self) -> None:
        """The ctime tracepoint programs drop a changed file's entry before the writer's call
        returns; held by links, so they go with the process."""
        assert self.obj is not None
        for name in self._tracepoint_programs:
            self._trace_links.append(self.obj.program(name).attach())
        self.coherence_tracepoints = bool(self._trace_links)

    def _disown(self) -> None:
        """In a forked child (a server's worker): let go of the links and of the run lock, so
        that they go with the process that made them. A child that outlives a SIGKILLed parent
        by a moment would keep XDP attached and the port's lock held (next start: "already
        running"). The fds are pointed at /dev/null rather than closed: nothing in the child
        may close a number reused since."""
        held = [link.fd for link in (self._xdp_link, *self._trace_links) if link is not None]
        if self._lock._file is not None:
            held.append(self._lock._file.fileno())
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for fd in held:
                os.dup2(null, fd)
        finally:
            os.close(null)
        self._xdp_link, self._trace_links, self._lock._file = None, [], None
        self.attachment, self._state = None, RunState()  # nothing to detach or restore from here
        self._pinned.clear()
        _RUNNING.discard(self)

    def close(self) -> None:
        """Detach everything and remove the pins; every step runs even if an earlier one fails."""
        _RUNNING.discard(self)
        problems: list[str] = []

        def step(what: str, action) -> None:  # type: ignore[no-untyped-def]
            try:
                action()
            except OSError as exc:
                problems.append(f"{what}: {exc.strerror or exc}")

        for link in self._trace_links:
            step(f"{link.name} detach", link.destroy)
        self._trace_links.clear()
        if self._xdp_link is not None:
            step("XDP detach", self._xdp_link.destroy)
            self._xdp_link = None

        def detach_tc(attachment: Attachment) -> None:
            with _shared_lock():  # no other server attaches between our detach and the check
                if attachment.tc_prog_id:
                    step("TC detach", lambda: libbpf.tc_detach(attachment.ifindex, tc_handle(self.settings.port),
                                                               TC_PRIORITY))
                    attachment.tc_prog_id = 0
                step("clsact removal", lambda: _release_clsact(attachment.ifindex, attachment.interface))

        if self.attachment is not None:
            step("TC lock", lambda: detach_tc(self.attachment))
        for pin in self._pinned:
            step(f"unpin {pin}", lambda pin=pin: pin.unlink(missing_ok=True))
        self._pinned.clear()
        step("pin directory", lambda: _remove_pin_dir(self.settings.port))
        if self._state.syncookies_before is not None:
            step("tcp_syncookies", lambda: _write_syncookies(self._state.syncookies_before))  # type: ignore[arg-type]
        self.maps = {}
        if self.obj is not None:
            self.obj.close()
            self.obj = None
        self._lock.release(remove=not problems)
        for problem in problems:
            log.error("cleanup: %s", problem)
