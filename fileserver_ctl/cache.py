"""What the kernel fast path may answer: file_cache/file_data entries built from response.py.

A file version is one byte stream in file_data, in FS_CHUNK_SIZE pieces: the exact 200 head user
space would send (response.file_head), then the body right after it, so a keep-alive answer is
one contiguous copy and the head costs no element of its own. The 304 head is not stored: it is
its status line and a few slices of the 200 head (Server and Date, Last-Modified and ETag, the
end), which the program puts together; user space checks that gives its own 304 head byte for
byte. Its file_cache entry says where the head's slices, the Date and the ETag values are, and
holds the checksum of every payload variant, so the TC program only copies bytes, writes the
current Date and patches the checksum for it. The stream's key is an id derived from the file version (name,
ETag, ctime, heads without their Date), so re-adding an unchanged file finds it cached as it is,
and a new version is complete before its entry points at it.

Replacing a version is atomic as the program sees it: the new stream is written under its own
id, each path's file_cache value is replaced with one map update (the kernel swaps the element),
and the old stream's chunks are deleted last. A key is deleted first only when the file really
changed and its old entry could otherwise be answered (see _install_checked).

Coherence (the kernel must stop serving old bytes at once): fentry on the VFS is refused on
hardened kernels, but tracepoints are not. Every change that matters sets the inode's ctime,
and tp_btf programs on the ctime tracepoints (bpf/coherence.bpf.h) delete the inode from
cached_inodes before the writer's system call returns; the TC program answers only entries whose
inode is still there. On top, the process that owns the cache holds a read lease on every
cached file, so a writer's open(O_WRONLY/O_TRUNC) or truncate() waits in the kernel until the
entry is gone (and no version being written can be cached), inotify sees renames of directories
and new precompressed siblings, and every cached file is re-checked once a second.
Worker processes of the server forward the files they serve (on_served) to the owner through a
pipe, so leases, watches and map writes all happen in one process.

Installing a version, in this order: drop the keys of an older version that must not be
answered any more, put the inode in cached_inodes, re-stat the path (same inode, size, mtime,
ctime as read), write the stream and replace the entries, and check the inode is still there. A change after the re-stat deletes the inode and the program
stops answering; one before it is seen by the re-stat. A file changed less than
cache_policy.SETTLE_NS ago is refilled only after that delay.

Which files: cache_policy.py (memory budget counted in real kernel memory, admission by request
heat, eviction of the coldest). The kernel counts hits per entry (fs_entry.hits); misses come from
the kernel's hand-off events (FS_EVENT_HANDOFF for a path not cached, or cached but changed),
and from on_served when nothing reads those events.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import hashlib
import heapq
import json
import logging
import os
import select
import signal
import stat
import string
import struct
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import response
from .response import DATE_LEN
from .cache_policy import SETTLE_NS, CachePolicy, Decision, Layout, settled, tail_class
from .config import ABI_HEADER, Settings
from .http_files import others_may_search
from .keepalive import IdleCloser
from .readiness import readable
from .retransmit import TimerKicks

CLOSE_HEADER = b"Connection: close\r\n"
INDEX = "index.html"
# Request-path characters the TC program takes as they are (bpf/http.bpf.h: PCHAR set); it
# hands off anything with "/." or "//", so such names are not worth caching.
_PLAIN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/")

ADMIT_PER_SWEEP = 64  # uncached files tried per once-a-second sweep
BUSY = "busy"  # _build: the file is being written; try again later
RUN_ROOT = Path("/run/fileserver")  # as kernel.RUN_ROOT: where a server keeps its run state

log = logging.getLogger("fileserver.cache")


def coherence_mechanism(tracepoints: bool | None = None, leases: bool | None = None) -> str:
    """What stops the kernel cache serving a changed file on this machine, strongest first
    (fentry on the VFS is refused on hardened kernels). None: find out (kernel BTF, sysctl)."""
    if tracepoints is None:
        from .kernel import COHERENCE_PROGRAMS, kernel_has_tracepoints

        tracepoints = kernel_has_tracepoints(list(COHERENCE_PROGRAMS.values()))
    if leases is None:
        leases = _leases_enabled()
    parts = []
    if tracepoints:
        parts.append("inode ctime tracepoints (tp_btf) stop a changed file in the kernel before the "
                     "writer's call returns (write, truncate, rename over it, unlink, chmod)")
    if leases:
        parts.append("read leases hold a writer's open(O_WRONLY/O_TRUNC) and truncate() until the "
                     "entry is gone")
    parts.append("inotify and a once-a-second re-check catch the rest" if tracepoints else
                 "inotify drops renamed and deleted files (asynchronously) and a once-a-second "
                 "re-check catches the rest")
    return "; ".join(parts)


def __getattr__(name: str) -> str:
    if name == "COHERENCE_WITHOUT_FENTRY":  # doctor.py: what is active here
        return coherence_mechanism()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def state_path(port: int) -> Path:
    """Where the cache of the server on `port` publishes its figures for fsctl stats."""
    return RUN_ROOT / f"{port}.cache.json"


def _leases_enabled() -> bool:
    try:
        return Path("/proc/sys/fs/leases-enable").read_text().strip() != "0"
    except OSError:
        return False

LEASE_SIGNAL = signal.SIGRTMIN + 7  # lease breaks; blocked and taken with sigtimedwait
# inotify(7) masks
IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_IGNORED, IN_ISDIR, IN_Q_OVERFLOW = 0x8000, 0x40000000, 0x4000
WATCH_MASK = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF)
_EVENT = struct.Struct("iIII")


def payload_sum(data: bytes) -> int:
    """Ones'-complement sum of data, folded to 16 bits, as the TC program adds it.

    It is the sum of little-endian 16-bit words (an odd last byte counts as the low byte),
    which is what bpf_csum_diff()/csum_partial() return on a little-endian host.
    """
    if len(data) % 2:
        data += b"\0"
    words = array.array("H", data)
    if sys.byteorder != "little":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def keys_for(rel_path: str) -> list[str]:
    """Request paths answered by a file: its own, and its directory's for an index.html."""
    rel = rel_path.strip("/")
    keys = ["/" + rel]
    if rel == INDEX:
        keys.append("/")
    elif rel.endswith("/" + INDEX):
        keys.append("/" + rel[:-len(INDEX)])
    return keys


def rel_for(key: str) -> str:
    """The docroot-relative file a request path names (the inverse of keys_for)."""
    rel = key.lstrip("/")
    return rel + INDEX if key.endswith("/") else rel


@dataclass(frozen=True)
class CachedFile:
    """One file_cache entry as user space sees it."""

    path: str        # the request path it answers, "/a/b.html"
    size: int        # body bytes
    hits: int        # answers the kernel sent from it
    etag: str


class FileWatch:
    """Leases on cached files and inotify watches on their directories, in the owner process.

    `changed(rel, tree)` is called (from a watcher thread) when the file at `rel` (or, with
    tree=True, anything under `rel`) may have changed; `forwarded(rel)` for each path a worker
    process sent with forward(); `retry(rel)` (default: forwarded) for each path given to later().
    """

    MAX_LATER = 4096  # paths waiting to be retried

    def __init__(self, root: Path, changed: Any, forwarded: Any, retry: Any = None) -> None:
        self.root = root
        self._changed, self._forwarded = changed, forwarded
        self._retry = retry or forwarded
        self._owner = os.getpid()
        self._leases: dict[int, str] = {}       # fd -> rel
        self._lease_fds: dict[str, set[int]] = {}  # rel -> its fds in _leases (no scans)
        self._dirs: dict[int, str] = {}         # inotify wd -> rel dir ("" is the docroot)
        self._watched: dict[str, int] = {}
        self._watch_lock = threading.Lock()     # hold() adds watches, the watcher drops them
        self._stop = threading.Event()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._inotify = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe_r, self._pipe_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._pipe_w, False)
        self._later: list[tuple[float, str]] = []  # heap of (time.monotonic() due, rel)
        self._later_lock = threading.Lock()
        # lease() registers an fd before the lease is on it; check_leases() must not look at it
        # in between (no lease yet reads as one being broken, and the file would be dropped)
        self._lease_lock = threading.Lock()
        self.leases = self._setup_leases()
        threading.Thread(target=self._watch_loop, name="cache-inotify", daemon=True).start()
        if self.leases:
            _LeaseBreaks.watch(self)

    def _setup_leases(self) -> bool:
        """Leases need the lease-break signal kept for _LeaseBreaks' thread: block it (threads
        started later inherit that) and catch it in case an older thread is the one it lands on."""
        try:
            if Path("/proc/sys/fs/leases-enable").read_text().strip() == "0":
                return False
            signal.signal(LEASE_SIGNAL, lambda *_: _LeaseBreaks.pending.set())
        except (OSError, ValueError):  # ValueError: not the main thread
            return False
        signal.pthread_sigmask(signal.SIG_BLOCK, {LEASE_SIGNAL})
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one fd per cached file
        except (ImportError, OSError, ValueError):
            pass
        return True

    @property
    def in_owner(self) -> bool:
        return os.getpid() == self._owner

    def forward(self, rel: str) -> bool:
        """From a worker: ask the owner to cache rel (dropped when the pipe is full)."""
        data = rel.encode("utf-8", "surrogateescape") + b"\n"
        if len(data) > select.PIPE_BUF:
            return False
        try:
            return os.write(self._pipe_w, data) == len(data)
        except OSError:
            return False

    def later(self, rel: str, delay: float) -> None:
        """In the owner: hand rel to retry() in `delay` seconds (once per path)."""
        with self._later_lock:
            if len(self._later) >= self.MAX_LATER or any(r == rel for _, r in self._later):
                return
            heapq.heappush(self._later, (time.monotonic() + delay, rel))
        try:
            os.write(self._pipe_w, b"\n")  # wake the watcher so it waits for the new deadline
        except OSError:
            pass

    def _due(self) -> tuple[list[str], float]:
        """Paths due now, and seconds until the next one (at most 0.5)."""
        due, now = [], time.monotonic()
        with self._later_lock:
            while self._later and self._later[0][0] <= now:
                due.append(heapq.heappop(self._later)[1])
            wait = min(self._later[0][0] - now, 0.5) if self._later else 0.5
        return due, wait

    def lease(self, fd: int, rel: str) -> bool | None:
        """Take a read lease on fd, a file of rel: True held, False refused (someone writes the
        file now), None when this file system or setup has no leases. A held lease is known
        from now on, so a break that comes before the entry is in place is not lost (the writer
        would wait lease-break-time)."""
        if not self.leases:
            return None
        with self._lease_lock:
            self._leases[fd] = rel
            self._lease_fds.setdefault(rel, set()).add(fd)
            try:
                fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_SIGNAL)
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except OSError as exc:
                self._forget_lease(fd)
                return False if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
        return True

    def hold(self, rel: str, fd: int | None) -> None:
        """Keep fd (leased) for rel, dropping rel's older leases, and watch the directories on
        its path."""
        self.release(rel, keep=fd)
        parts = rel.split("/")[:-1]
        for depth in range(len(parts) + 1):
            self._watch_dir("/".join(parts[:depth]))

    def leased(self) -> set[str]:
        """The paths holding a lease now."""
        return set(self._leases.values())

    def release(self, rel: str, keep: int | None = None) -> None:
        """Give up rel's leases (but the one on fd `keep`)."""
        for fd in list(self._lease_fds.get(rel, ())):
            if fd != keep:
                self.unlease(fd)

    def unlease(self, fd: int | None) -> None:
        """Give up the lease on fd, if any, and close it."""
        if fd is None:
            return
        with self._lease_lock:  # check_leases() must not query a closed (or reused) fd
            self._forget_lease(fd)
            try:
                fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError:
                pass
            os.close(fd)

    def _watch_dir(self, rel_dir: str) -> None:
        if rel_dir in self._watched or self._inotify < 0:
            return
        path = os.fsencode(self.root / rel_dir if rel_dir else self.root)
        with self._watch_lock:
            wd = self._libc.inotify_add_watch(self._inotify, path, WATCH_MASK)
            if wd >= 0:
                self._dirs[wd] = rel_dir
                self._watched[rel_dir] = wd

    def _unwatch(self, rel: str) -> None:
        """Stop watching rel and the directories below it: the path leads elsewhere now (a
        directory or a symlink to one was renamed, replaced or deleted), and a watch stays on
        the inode it was made on. hold() watches what the path leads to when a file under it
        is cached again."""
        with self._watch_lock:
            for rel_dir, wd in list(self._watched.items()):
                if rel and rel_dir != rel and not rel_dir.startswith(rel + "/"):
                    continue
                del self._watched[rel_dir]
                if self._dirs.get(wd) == rel_dir:
                    del self._dirs[wd]  # its IN_IGNORED then finds no directory to forget
                    self._libc.inotify_rm_watch(self._inotify, wd)

    def _forget_lease(self, fd: int) -> None:
        """Drop fd from the registry (the caller holds _lease_lock)."""
        rel = self._leases.pop(fd, None)
        fds = self._lease_fds.get(rel)
        if fds is not None:
            fds.discard(fd)
            if not fds:
                del self._lease_fds[rel]

    def close(self) -> None:
        self._stop.set()
        _LeaseBreaks.forget(self)
        for fd in list(self._leases):
            self.unlease(fd)

    # -- watcher threads --------------------------------------------------------------------

    def check_leases(self) -> None:
        """A lease is being broken somewhere: drop the entries of ours that are."""
        # siginfo does not name the fd in Python: find the leases being broken
        with self._lease_lock:
            broken = []
            for fd, rel in list(self._leases.items()):
                try:
                    if fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK:
                        broken.append(rel)
                except OSError:
                    broken.append(rel)
        for rel in broken:
            self._changed(rel, False)  # drops the entry, then releases the lease

    def _watch_loop(self) -> None:
        buf = b""
        while not self._stop.is_set():
            due, wait = self._due()
            for rel in due:
                self._retry(rel)
            ready = readable([fd for fd in (self._inotify, self._pipe_r) if fd >= 0], wait)
            if self._pipe_r in ready:
                buf += os.read(self._pipe_r, 65536)
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line:  # an empty line only wakes us (later())
                        self._forwarded(line.decode("utf-8", "surrogateescape"))
            if self._inotify in ready:
                self._read_events()

    def _read_events(self) -> None:
        try:
            data = os.read(self._inotify, 65536)
        except BlockingIOError:
            return
        at = 0
        while at + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, at)
            name = data[at + _EVENT.size:at + _EVENT.size + length].rstrip(b"\0")
            at += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self._changed("", True)  # lost events: forget everything
                continue
            rel_dir = self._dirs.get(wd)
            if rel_dir is None:
                continue
            if mask & IN_IGNORED:
                with self._watch_lock:
                    if self._dirs.get(wd) == rel_dir:
                        del self._dirs[wd]
                        if self._watched.get(rel_dir) == wd:
                            del self._watched[rel_dir]
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                self._unwatch(rel_dir)
                self._changed(rel_dir, True)
                continue
            rel = "/".join(p for p in (rel_dir, os.fsdecode(name)) if p)
            # a directory of cached files by that name, or a symlink to one (no IN_ISDIR)
            was_dir = rel in self._watched
            if was_dir and mask & (IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_CREATE):
                self._unwatch(rel)  # the name was replaced: its watches are on the old inodes
            self._changed(rel, was_dir or bool(mask & IN_ISDIR))


class _LeaseBreaks:
    """The one thread of a process that takes lease-break signals. A realtime signal is queued
    once per break and taken by one thread only, so every FileWatch of the process (tests make
    several, one after the other) looks at its leases for each; a thread per FileWatch could
    swallow a break meant for another, and the writer would wait lease-break-time (45 s)."""

    pending = threading.Event()  # the signal landed on a thread that does not block it
    _watches: set[FileWatch] = set()
    _lock = threading.Lock()
    _thread: threading.Thread | None = None
    _pid = 0

    @classmethod
    def watch(cls, fw: FileWatch) -> None:
        with cls._lock:
            cls._watches.add(fw)
            if cls._thread is None or cls._pid != os.getpid():  # none yet, or a fork's copy
                cls._pid = os.getpid()
                cls._thread = threading.Thread(target=cls._run, name="cache-leases", daemon=True)
                cls._thread.start()

    @classmethod
    def forget(cls, fw: FileWatch) -> None:
        with cls._lock:
            cls._watches.discard(fw)

    @classmethod
    def _run(cls) -> None:
        while True:
            got = signal.sigtimedwait({LEASE_SIGNAL}, 0.5)
            if got is None and not cls.pending.is_set():
                continue
            cls.pending.clear()
            with cls._lock:
                watches = list(cls._watches)
            for fw in watches:
                try:
                    fw.check_leases()
                except Exception:  # the next break must still be taken
                    log.exception("kernel cache: lease break not handled")


class KernelCache:
    """Fills, re-checks and invalidates the kernel's file cache; `maps` are the loaded maps.

    `tracepoints`: whether the ctime tracepoint programs are attached (None: whether this
    kernel has them), for the coherence description; `state_file`: where to publish figures
    once a second for fsctl stats (None: nowhere).
    """

    def __init__(self, maps: Mapping[str, Any], settings: Settings, *, tracepoints: bool | None = None,
                 state_file: Path | None = None) -> None:
        from .libbpf import Abi  # cffi stays inside libbpf.py

        self.abi = Abi(ABI_HEADER)
        self.settings = settings
        self.docroot = Path(settings.docroot).resolve()
        self._cache = maps["file_cache"]
        self._data = maps["file_data"]
        self._tail_caps = tuple(self.abi.const(f"FS_TAIL_CAP_{k}")
                                for k in range(1, self.abi.const("FS_TAIL_CLASSES") + 1))
        self._tails = [maps[f"file_tail_{cap}"] for cap in self._tail_caps]
        self._head_room = self.abi.const("FS_HEAD_ROOM")
        self._date = maps["http_date"]
        self._path_max = self.abi.const("FS_PATH_MAX")
        self._head_max = self.abi.const("FS_HEAD_MAX")
        self._chunk = self.abi.const("FS_CHUNK_SIZE")
        self._slot = self.abi.const("FS_DATE_SLOT")
        self._body_max = self.abi.const("FS_BODY_MAX")  # the kernel sends it in segments
        self._resp = self.abi.enum("fs_resp")
        self._encoded_flag = self.abi.enum("fs_entry_flags")["FS_ENTRY_F_ENCODED"]
        self._no_304_flag = self.abi.enum("fs_entry_flags")["FS_ENTRY_F_NO_304"]
        self._slices = self.abi.const("FS_304_SLICES")
        if len(STATUS_304) != self.abi.const("FS_304_STATUS_LEN"):
            raise RuntimeError("fileserver.h: FS_304_STATUS_LEN is not the length of the 304 status line")
        self._lock = threading.RLock()   # the watcher threads invalidate concurrently
        self._held: set[str] = set()     # files this (owner) process has cached
        self._orphans: dict[str, bytes] = {}  # unlinked keys whose chunks remove() drops
        self._inodes: dict[tuple[int, int], set[str]] = {}  # (dev, ino) -> cached paths
        self._inode_of: dict[str, tuple[int, int]] = {}  # the reverse: cached path -> (dev, ino)
        self._inode_map = maps.get("cached_inodes")
        self._events_map = maps.get("events")
        self._events: Any = None  # the RingBuffer, while watch_events() runs
        self._misses_from_events = False  # hand-off events are read (watch_events or tap)
        self._events_stop = threading.Event()
        self._events_thread: threading.Thread | None = None
        self._event_fields = _event_fields(self.abi)
        stat_ids = self.abi.enum("fs_stat")
        self._miss_reasons = {stat_ids[name] for name in ("FS_STAT_HANDOFF_MISS", "FS_STAT_HANDOFF_STALE")
                              if name in stat_ids}
        self._handoff_type = self.abi.enum("fs_event_type").get("FS_EVENT_HANDOFF")
        self.layout = self._measure_layout()
        # what the maps can hold at most (their max_entries): a larger budget is never reached
        self.capacity = (self._cache.max_entries * self.layout.entry_element
                         + self._data.max_entries * self.layout.chunk_element
                         + sum(m.max_entries * e for m, e in zip(self._tails, self.layout.tail_elements)))
        self.policy = CachePolicy(budget=min(settings.cache_size, self.capacity),
                                  max_file=settings.cache_max_file, layout=self.layout)
        # the maps' memlock figure with nothing cached: what they take before any file
        self._memlock_empty = (self.memlock() - len(self._cache) * self.layout.entry_element
                               - len(self._data) * self.layout.chunk_element
                               - sum(len(m) * e for m, e in zip(self._tails, self.layout.tail_elements)))
        self.state_file = state_file
        self._watch = FileWatch(self.docroot, self._on_change, self._served, retry=self.add)
        self.coherence = coherence_mechanism(tracepoints, self._watch.leases)
        self._idle = IdleCloser(maps, self.abi, _keepalive_timeout()) if "conn_track" in maps else None
        # retransmission timers fire in the kernel but send through a test run from here
        self._kicks = TimerKicks.start(maps, self.abi, settings.interface, settings.port)
        if self._idle is not None and self._kicks is not None:
            self._idle.ask = self._kicks.close_if_idle

    # -- public API (contract 8) ---------------------------------------------------------

    def fill(self, docroot: str | os.PathLike[str] | None = None) -> int:
        """Cache the regular, non-hidden files under docroot that fit the budget, in the
        policy's order (index.html first, then the smallest); returns how many."""
        root = Path(docroot).resolve() if docroot is not None else self.docroot
        found, newest = [], 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith("."):
                    continue
                try:
                    st = os.stat(Path(dirpath) / name)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append(((Path(dirpath) / name).relative_to(root).as_posix(), st.st_size))
                    newest = max(newest, st.st_ctime_ns)
        with self._lock:
            order = self.policy.fill_order(found)
        time.sleep(settled(newest, time.time_ns()) / 1e9)  # at most SETTLE_NS, once
        add = self._add if self._watch.in_owner else self.add  # published once, at the end
        count = sum(add(rel) for rel in order)
        self.publish()
        return count

    def add(self, rel_path: str) -> bool:
        """Cache one file (path relative to the docroot); False when it is not cached now.

        A file that is no longer cacheable (grown, gone, being written, unreadable) leaves the
        cache; one changed a moment ago is tried again once it has settled; one the budget has
        no room for stays with user space (cache_policy decides, and may evict colder files).
        In a worker process the path is passed on to the process that owns the cache.

        An admission or eviction is published at once (fsctl stats reads the maps live, and
        its figures must not lag them by up to the next sweep)."""
        rel = rel_path.strip("/")
        if not self._watch.in_owner:
            return self._watch.forward(rel)
        with self._lock:
            before = self._counts()
            cached = self._add(rel)
            if self._counts() != before:
                self.publish()
            return cached

    def _counts(self) -> tuple[int, ...]:
        """What an add() may change in the published figures."""
        p = self.policy
        return p.admitted, p.evicted, p.refused, len(p), p.used

    def _add(self, rel_path: str) -> bool:
        """add() in the owner, without publishing."""
        rel = rel_path.strip("/")
        with self._lock:
            built = self._build(rel)
            if not isinstance(built, tuple):
                self.remove(rel)
                if built is None:  # not cacheable: not proposed again until asked for again
                    self.policy.declined(rel)
                return False
            entry, stream, fd, st = built
            size = entry["body_len"]
            wait = settled(st.st_ctime_ns, time.time_ns())
            keys = len(keys_for(rel))
            decision = (Decision(False, why="changed a moment ago") if wait
                        else self.policy.consider(rel, size, keys, len(stream)))
            if not decision.admit:
                self._watch.unlease(fd)
                self.remove(rel)
                if wait:
                    self._watch.later(rel, wait / 1e9)
                log.debug("kernel cache: %s not cached: %s", rel, decision.why)
                return False
            current = self._lookup(keys_for(rel)[0])
            if (rel in self._held and current is not None and current["data_id"] == entry["data_id"]
                    and self._inode_present((entry["dev"], entry["ino"]))):
                self._watch.unlease(fd)  # cached as it is (asked for twice): the first lease stays
                return True
            for victim in decision.evict:
                self.remove(victim, evicted=True)
                log.debug("kernel cache: evicted %s for %s", victim, rel)
            if self._install_checked(rel, entry, stream, st):
                self._watch.hold(rel, fd)
                self._held.add(rel)
                self.policy.cached(rel, size, keys, len(stream))
                return True
            self._watch.unlease(fd)
            self.remove(rel)
            return False

    def _install_checked(self, rel: str, entry: dict[str, Any], stream: bytes, st: os.stat_result) -> bool:
        """Install a version read from `st` so that no request sent after a change completes
        gets it (see the module doc for the order), and so that a path whose file did not
        change is never missing in between: its entry is replaced in place.

        The inode goes back into cached_inodes only while no entry can be answered with it: the
        kernel deleted it because the file changed, and an entry still pointing at it (of this
        path, or of another name of the same file) holds the bytes from before, whatever its
        version id (the version at hand may have been read before that change; the re-stat
        after the insert finds out). An entry of another inode the kernel still answers (the
        path names another file now, say after a directory rename) goes first too."""
        inode = (entry["dev"], entry["ino"])
        present = self._inode_present(inode)
        stale = []
        for key in keys_for(rel):
            old = self._lookup(key)
            if old is None:
                continue
            if (old["dev"], old["ino"]) == inode:
                if not present:
                    stale.append(key)  # it would be answered again once the inode is back
            elif self._inode_current(old):
                stale.append(key)
        # another name of the same changed file: it is cached again once settled
        others = set() if present else self._inodes.get(inode, set()) - {rel}
        for key in stale:
            self._unlink_key(key)
        for other in others:
            self.remove(other)
            self._watch.later(other, SETTLE_NS / 1e9)
        self._track_inode(rel, inode, insert=not present)
        return (self._unchanged(rel, st) and self._install(rel, entry, stream)
                and self._inode_current(entry))

    def _inode_present(self, inode: tuple[int, int]) -> bool:
        return self._inode_map is None or self._inode_key(inode) in self._inode_map

    def _served(self, rel: str) -> None:
        """A worker served rel from user space (on_served), or a retry came due."""
        if not self._misses_from_events:  # then this is the only count of misses there is
            with self._lock:
                self.policy.missed(rel.strip("/"))
        self.add(rel)

    def _track_inode(self, rel: str, inode: tuple[int, int], *, insert: bool = True) -> None:
        """Remember which cached paths share the file's inode and, with insert, put the inode in
        cached_inodes (the kernel deletes it when the inode changes)."""
        other = self._inode_of.get(rel)
        if other is not None and other != inode:
            self._untrack_inode(rel, other)
        self._inodes.setdefault(inode, set()).add(rel)
        self._inode_of[rel] = inode
        if insert and self._inode_map is not None:
            self._inode_map[self._inode_key(inode)] = (1).to_bytes(8, "little")

    def _untrack_inode(self, rel: str, inode: tuple[int, int]) -> None:
        if self._inode_of.get(rel) == inode:
            del self._inode_of[rel]
        paths = self._inodes.get(inode)
        if paths is None:
            return
        paths.discard(rel)
        if not paths:
            del self._inodes[inode]
            if self._inode_map is not None:
                try:
                    del self._inode_map[self._inode_key(inode)]
                except KeyError:
                    pass

    def _inode_key(self, inode: tuple[int, int]) -> bytes:
        return self.abi.pack("struct fs_inode_key", {"dev": inode[0], "ino": inode[1]})

    def _inode_current(self, entry: dict[str, Any]) -> bool:
        """The kernel has not seen the entry's inode change since it was cached."""
        if self._inode_map is None or not entry["ino"]:
            return True
        return self._inode_key((entry["dev"], entry["ino"])) in self._inode_map

    def _unchanged(self, rel: str, st: os.stat_result) -> bool:
        """After the entry is in place: the path still names the inode we read, unchanged."""
        path = self._resolve(rel)
        try:
            now = os.stat(path) if path is not None else None
        except OSError:
            return False
        return now is not None and _version(now) == _version(st)

    def _install(self, rel: str, entry: dict[str, Any], stream: bytes) -> bool:
        """Write the stream's chunks, then replace each key's entry with one map update, then
        drop the chunks of the versions no key points at any more (the budget is cache_policy's,
        checked before). On failure (a map is full) the caller removes rel."""
        keys = keys_for(rel)
        new_id = entry["data_id"]
        # versions whose keys were deleted before (chunks kept until now): no longer answered
        retired = [self.abi.unpack("struct fs_entry", raw)
                   for raw in filter(None, (self._orphans.pop(key, None) for key in keys))]
        installed = True
        try:
            for m, index, piece in self._chunks(stream):
                m[self._data_key(new_id, index)] = piece
            value = self.abi.pack("struct fs_entry", entry)
            for key in keys:
                raw = self._path_key(key)
                retired.append(self._lookup_raw(raw))
                self._cache[raw] = value  # the kernel replaces the element at once
        except OSError:  # a map is full: user space keeps serving it
            installed = False
        live = {e["data_id"] for e in map(self._lookup, keys) if e is not None}
        if new_id not in live:
            self._drop_chunks(new_id, len(stream))
        for data_id, length in {(e["data_id"], _stream_len(e)) for e in retired if e}:
            if data_id not in live and data_id != new_id:
                self._drop_chunks(data_id, length)
        return installed

    def remove(self, rel_path: str, *, evicted: bool = False) -> bool:
        """Stop answering a file in the kernel; True when it was cached."""
        rel = rel_path.strip("/")
        with self._lock:
            removed = self._remove(rel)
            self.policy.dropped(rel, evicted=evicted)
            if self._watch.in_owner:
                self._watch.release(rel)
                self._held.discard(rel)
                inode = self._inode_of.get(rel)
                if inode is not None:
                    self._untrack_inode(rel, inode)
            return removed

    def _remove(self, rel_path: str) -> bool:
        removed = False
        for key in keys_for(rel_path):
            if not self._plain(key):
                continue  # never cached
            olds = []
            orphan = self._orphans.pop(key, None)
            if orphan is not None:
                olds.append(self.abi.unpack("struct fs_entry", orphan))
            live = self._lookup(key)
            if live is not None:
                try:
                    del self._cache[self._path_key(key)]
                    olds.append(live)
                except KeyError:
                    pass
            for old in olds:
                removed = True
                self._drop_chunks(old["data_id"], _stream_len(old))
        return removed

    def write_date(self, now: float | None = None) -> None:
        """Write the Date value for `now` (the program puts it into every answer) and its sum
        (the program adds it to the entry's, which leaves the Date out)."""
        value = response.http_date(time.time() if now is None else now).encode().ljust(self._slot, b"\0")
        self._date[(0).to_bytes(4, "little")] = self.abi.pack(
            "struct fs_date", {"value": value, "sum": payload_sum(value)})

    def refresh_date(self, now: float | None = None) -> None:
        """Write the current Date, then re-check the cached files; called once a second."""
        self.write_date(now)
        self.revalidate()
        if self._idle is not None and self._watch.in_owner:
            self._idle.close_idle()  # owned keep-alive connections time out like user space's

    def revalidate(self) -> int:
        """Re-read cached files whose version (ETag) or encodings changed, drop the ones that
        are gone; returns how many entries changed."""
        changed = 0
        if not self._watch.in_owner:
            return 0
        hits: dict[str, int] = {}
        for rel, entry, rel_hits in self._cached_versions():
            hits[rel] = rel_hits
            path = self._resolve(rel)
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            if (st is None or response.etag(st) != self._etag(entry)
                    or bool(entry["flags"] & self._encoded_flag) != _has_encoded_sibling(path)
                    or not self._inode_current(entry)):
                self.add(rel)
                changed += 1
        self.sweep(hits)
        return changed

    def sweep(self, hits: Mapping[str, int]) -> None:
        """Fold the kernel's hit counters into the policy, admit the uncached files it proposes
        (evicting colder ones), and publish the figures."""
        with self._lock:
            worth = self.policy.sweep(hits)
        for rel in worth[:ADMIT_PER_SWEEP]:
            if rel not in self.policy:
                self.add(rel)
        self.publish()

    def entries(self) -> list[CachedFile]:
        """What file_cache holds now, sorted by path."""
        found = []
        for raw_key in list(self._cache):
            e = self._lookup_raw(raw_key)
            if e is None:
                continue
            found.append(CachedFile(path=raw_key.rstrip(b"\0").decode("latin-1"),
                                    size=e["body_len"], hits=e["hits"], etag=self._etag(e) or ""))
        return sorted(found, key=lambda f: f.path)

    def __iter__(self) -> Iterator[CachedFile]:
        return iter(self.entries())

    def close(self) -> None:
        """Stop watching and release the leases (the entries stay)."""
        self._watch.close()
        if self._idle is not None:
            self._idle.close()
        if self._kicks is not None:
            self._kicks.close()
        self._events_stop.set()
        if self._events_thread is not None:
            self._events_thread.join(timeout=2)
        if self._events is not None:
            self._events.close()
            self._events = None
        if self.state_file is not None and self._watch.in_owner:
            self.state_file.unlink(missing_ok=True)

    # -- misses from the kernel's hand-off events ------------------------------------------

    def watch_events(self) -> bool:
        """Read the `events` ring buffer in a thread, counting misses (note_event). Only when
        nothing else reads it: with an access log, pass its records through tap() instead."""
        if self._events_map is None or self._handoff_type is None or self._events_thread is not None:
            return False
        from .libbpf import RingBuffer

        self._events = RingBuffer(self._events_map, self.note_event)
        self._misses_from_events = True
        self._events_thread = threading.Thread(target=self._poll_events, name="cache-events", daemon=True)
        self._events_thread.start()
        return True

    def tap(self, callback: Any) -> Any:
        """A ring-buffer callback that counts misses, then hands the record to `callback`."""
        self._misses_from_events = True

        def both(data: bytes) -> Any:
            self.note_event(data)
            return callback(data)

        return both

    def note_event(self, data: bytes) -> int:
        """One `events` record: a request handed to user space because its path is not cached
        (or its file changed) is a miss for that file. Returns 0 (go on)."""
        fields = self._event_fields
        if len(data) < fields["size"]:
            return 0
        (kind,), (reason,) = (struct.unpack_from("=I", data, fields[name]) for name in ("type", "reason"))
        if kind != self._handoff_type or reason not in self._miss_reasons:
            return 0
        key = data[fields["key"]:fields["key"] + self._path_max].split(b"\0", 1)[0]
        if key.startswith(b"/"):
            with self._lock:
                self.policy.missed(rel_for(key.decode("latin-1")))
        return 0

    def _poll_events(self) -> None:
        while not self._events_stop.is_set():
            try:
                self._events.poll(200)
            except OSError as exc:
                log.warning("kernel cache: events not read any more: %s", exc)
                return

    def _on_change(self, rel: str, tree: bool) -> None:
        """A watcher saw rel (a file, or with tree=True a directory) change: drop what it may
        have made stale at once, and try it again once it has settled."""
        with self._lock:
            if tree:
                stale = {h for h in self._held if not rel or h == rel or h.startswith(rel + "/")}
            else:
                stale = {rel}
                for _coding, suffix in _precompressed():
                    if rel.endswith(suffix):
                        stale.add(rel[:-len(suffix)])  # Vary and the choice of coding change
            stale &= self._held | self._watch.leased()  # a lease taken by an add under way too
            # the program stops answering first (one delete per key), bookkeeping after
            for held in stale:
                for key in keys_for(held):
                    if self._plain(key):
                        self._unlink_key(key)
            for held in stale:
                self.remove(held)
                self._watch.later(held, SETTLE_NS / 1e9)  # refill once it has settled
                log.debug("kernel cache: dropped %s (changed on disk)", held)

    def cached_bytes(self) -> int:
        """Body bytes of the files this cache holds (each file once)."""
        return self.policy.body_bytes()

    def memlock(self) -> int:
        """The memlock figures of file_cache, file_data and the tail maps now, as the kernel
        reports them."""
        return sum(_memlock(m.fd) for m in (self._cache, self._data, *self._tails))

    def figures(self) -> dict[str, Any]:
        """What fsctl stats shows about the cache (published in state_file once a second)."""
        with self._lock:
            p = self.policy
            body = p.body_bytes()
            memlock = self.memlock() - self._memlock_empty
            return {
                "pid": os.getpid(),
                "files": len(p),
                "body_bytes": body,
                "budget": p.budget,
                "used": p.used,  # kernel memory of what is cached, as the budget counts it
                "max_file": p.max_file,
                "memlock_bytes": memlock,  # what the maps' memlock figures grew by
                "memlock_per_byte": round(memlock / body, 3) if body else None,
                "kernel_bytes_per_byte": round(p.used / body, 3) if body else None,
                "maps_memlock_empty": self._memlock_empty,
                "element_bytes": {"file_cache": self.layout.entry_element,
                                  "file_data": self.layout.chunk_element,
                                  **{f"file_tail_{cap}": e for cap, e in
                                     zip(self._tail_caps, self.layout.tail_elements)}},
                "admitted": p.admitted,
                "evicted": p.evicted,
                "refused": p.refused,
                "coherence": self.coherence,
            }

    def publish(self) -> None:
        """Write figures() to state_file (atomically), when there is one."""
        if self.state_file is None or not self._watch.in_owner:
            return
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(self.figures()))
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.debug("kernel cache: figures not published: %s", exc)

    def _measure_layout(self) -> Layout:
        """memlock bytes of one element of file_cache and of file_data: a probe key no request
        can reach (an empty path; a chunk index past any body) is inserted and deleted again."""
        far = self.abi.pack("struct fs_data_key", {"data_id": 0, "index": 0xFFFFFFFF})
        probes = ((self._cache, bytes(self._cache.key_size)), (self._data, far),
                  *((m, far) for m in self._tails))
        sizes = []
        for m, key in probes:
            estimate = _round8(m.key_size) + _round8(m.value_size) + _HTAB_OVERHEAD
            try:
                before = _memlock(m.fd)
                m[key] = bytes(m.value_size)
                try:
                    grew = _memlock(m.fd) - before
                finally:
                    del m[key]
            except (OSError, KeyError):
                grew = 0
            sizes.append(grew if grew > 0 else estimate)
        return Layout(entry_element=sizes[0], chunk_element=sizes[1], chunk_size=self._chunk,
                      heads=self._typical_heads(), tail_caps=self._tail_caps,
                      tail_elements=tuple(sizes[2:]), head_room=self._head_room)

    def _typical_heads(self) -> int:
        """Stream bytes besides the body of a typical file (an index.html of this docroot's
        inode numbers), for ranking files by size before their heads are built."""
        try:
            st = os.stat(self.docroot)
        except OSError:
            st = os.stat(".")
        built = self.entry_for(INDEX, st, b"")
        return _stream_len(built[0]) if built is not None else 0

    # -- maps ---------------------------------------------------------------------------

    def _path_key(self, key: str) -> bytes:
        return key.encode("latin-1").ljust(self._path_max, b"\0")

    def _data_key(self, data_id: int, index: int) -> bytes:
        return self.abi.pack("struct fs_data_key", {"data_id": data_id, "index": index})

    def _unlink_key(self, key: str) -> None:
        """Delete a file_cache key, keeping its entry's chunks to drop later (remove())."""
        raw = self._path_key(key)
        try:
            value = self._cache[raw]
            del self._cache[raw]
        except KeyError:
            return
        earlier = self._orphans.get(key)
        if earlier is not None and earlier[:8] != value[:8]:  # data_id comes first
            old = self.abi.unpack("struct fs_entry", earlier)
            self._drop_chunks(old["data_id"], _stream_len(old))
        self._orphans[key] = value

    def _lookup(self, key: str) -> dict[str, Any] | None:
        return self._lookup_raw(self._path_key(key))

    def _lookup_raw(self, raw_key: bytes) -> dict[str, Any] | None:
        try:
            return self.abi.unpack("struct fs_entry", self._cache[raw_key])
        except KeyError:
            return None

    def _tail(self, length: int) -> int:
        """The tail class of a stream of `length` bytes (cache_policy.tail_class)."""
        return tail_class(length, self._chunk, self._tail_caps, self._head_room)

    def _map_of(self, length: int, index: int) -> tuple[Any, int]:
        """(map, element bytes) holding chunk `index` of a stream of `length` bytes: the
        last one in its tail map when it has a tail class, the others in file_data."""
        tail = self._tail(length)
        if tail and index == length // self._chunk:
            return self._tails[tail - 1], self._tail_caps[tail - 1]
        return self._data, self._chunk

    def _chunks(self, stream: bytes) -> Iterator[tuple[Any, int, bytes]]:
        """(map, index, zero-padded bytes) of each chunk of a stream."""
        for index, start in enumerate(range(0, len(stream), self._chunk)):
            m, size = self._map_of(len(stream), index)
            yield m, index, stream[start:start + self._chunk].ljust(size, b"\0")

    def _drop_chunks(self, data_id: int, length: int) -> None:
        """Delete the chunks of a stream of `length` bytes."""
        for index in range(-(-length // self._chunk)):
            try:
                del self._map_of(length, index)[0][self._data_key(data_id, index)]
            except KeyError:
                pass

    def _etag(self, entry: dict[str, Any]) -> str | None:
        """The entry's ETag value, from its 200 head in chunk 0 (None when the chunk is gone)."""
        try:
            chunk = self._map_of(_stream_len(entry), 0)[0][self._data_key(entry["data_id"], 0)]
        except KeyError:
            return None
        start = entry["etag_off"]
        return chunk[start:start + entry["etag_len"]].decode("latin-1")

    def _cached_versions(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        """(rel path, entry, kernel hits of all its keys) of every cached file, once per file."""
        found: dict[str, tuple[dict[str, Any], int]] = {}
        for raw_key in list(self._cache):
            e = self._lookup_raw(raw_key)
            if e is None:
                continue
            rel = rel_for(raw_key.rstrip(b"\0").decode("latin-1"))
            first, hits = found.get(rel, (e, 0))
            found[rel] = (first, hits + e["hits"])
        for rel, (e, hits) in found.items():
            yield rel, e, hits

    # -- building entries ---------------------------------------------------------------

    def _plain(self, key: str) -> bool:
        """A request path the program can take as sent (and so a possible key)."""
        return (len(key) < self._path_max and _PLAIN_CHARS.issuperset(key)
                and "//" not in key and "/." not in key)

    def _resolve(self, rel: str) -> Path | None:
        """The file behind a docroot-relative path, if the kernel may answer it at all."""
        key = keys_for(rel)[0]
        if not self._plain(key) or key.endswith("/"):
            return None
        try:
            real = (self.docroot / rel).resolve(strict=True)
            inside = real.relative_to(self.docroot)
        except (OSError, ValueError, RuntimeError):
            return None
        if any(part.startswith(".") for part in inside.parts):
            return None  # user space answers 404 for hidden names, symlinked or not
        if not others_may_search(self.docroot, real.parent):
            return None  # behind a directory others may not search: user space says 403
        return real

    def _build(self, rel: str) -> tuple[dict[str, Any], bytes, int | None, os.stat_result] | str | None:
        """(entry, stream, leased fd or None, stat) for rel; None when it cannot be cached, BUSY
        while it is being written.

        Only files anyone may read are cached (as if the server ran as nobody, like nginx's
        workers): a file made unreadable stops being answered in the kernel, and user space
        decides what to answer."""
        if len(keys_for(rel)[0].encode("utf-8", "surrogateescape")) >= self._path_max:
            log.debug("kernel cache: %s not cached: its path is longer than the kernel's key "
                      "(%d bytes); user space serves it", rel, self._path_max - 1)
            return None
        path = self._resolve(rel)
        if path is None:
            return None
        try:
            # O_NONBLOCK: a FIFO must not hang us; it is refused as not regular right after
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        keep = False
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size > self.settings.cache_max_file:
                return None
            if not st.st_mode & stat.S_IROTH:
                return None
            leased = self._watch.lease(fd, rel)  # before reading: a write from now on waits for us
            if leased is False:
                return BUSY  # open for writing right now
            body = os.read(fd, st.st_size + 1) if st.st_size else b""
            after = os.fstat(fd)
            if len(body) != st.st_size or after.st_mtime_ns != st.st_mtime_ns:
                return BUSY  # written while we read: user space serves it until it settles
            built = self.entry_for(Path(rel).name, st, body, encoded=_has_encoded_sibling(path), rel=rel)
            if built is None:
                return None
            keep = bool(leased)
            entry = built[0]
            entry["ino"], entry["dev"] = st.st_ino, kernel_dev(st.st_dev)
            return entry, built[1], fd if keep else None, st
        except OSError:
            return None
        finally:
            if not keep:
                self._watch.unlease(fd)

    def entry_for(self, name: str, st: os.stat_result, body: bytes,
                  date: str | None = None, *, encoded: bool = False, rel: str | None = None,
                  ) -> tuple[dict[str, Any], bytes] | None:
        """(struct fs_entry fields, file_data stream) answering file `name` (stat `st`, at
        docroot-relative `rel`, default name) with `body`; None if the heads do not fit or do
        not have the shape the program relies on, or the file was modified after `date`.

        The stream is the 200 head, then the body. The 304 head is not stored: the program
        builds it from slices of the 200 head (_slices_304); when it cannot be built so, the
        entry says FS_ENTRY_F_NO_304 and the program hands If-None-Match requests off."""
        date = date or response.http_date(time.time())
        if response.modified_in_future(st, date):
            return None  # its Last-Modified is the Date of each answer: user space sends it
        vary = bool(encoded)
        heads = {(status, close): response.file_head(status, st, name, date, vary=vary, close=close)
                 for status in (200, 304) for close in (False, True)}
        head, head304 = heads[200, False], heads[304, False]
        # the program inserts "Connection: close" itself, right before the final CRLF
        for status, keep in ((200, head), (304, head304)):
            if heads[status, True] != keep[:-2] + CLOSE_HEADER + b"\r\n":
                return None
        if max(len(head), len(head304)) > self._head_max:
            return None
        if len(body) > self._body_max:
            return None
        date_b, etag_b = date.encode(), response.etag(st).encode()
        date_off, etag_off = _value_offset(head, b"Date"), _value_offset(head, b"ETag")
        if head[date_off:date_off + len(date_b)] != date_b or head[etag_off:etag_off + len(etag_b)] != etag_b:
            return None
        slices = _slices_304(head, head304, date_off, self._slices)
        flags = self._encoded_flag if vary else 0
        if slices is None:
            flags |= self._no_304_flag
            slices = [(0, 0)] * self._slices
        # summed with zeros for the Date: the program adds the sum of the one it sends
        undated_heads = {k: _without_date(h) for k, h in heads.items()}
        payloads = {
            "FS_RESP_GET": undated_heads[200, False] + body,
            "FS_RESP_GET_CLOSE": undated_heads[200, True] + body,
            "FS_RESP_HEAD": undated_heads[200, False],
            "FS_RESP_HEAD_CLOSE": undated_heads[200, True],
            "FS_RESP_304": undated_heads[304, False],
            "FS_RESP_304_CLOSE": undated_heads[304, True],
        }
        csum = [0] * self._resp["FS_RESP_MAX"]
        for variant, payload in payloads.items():
            csum[self._resp[variant]] = payload_sum(payload)
        stream = head + body
        # the version: whatever changes the file changes its ctime; the Date does not count,
        # so the same version built a second later has the same id (and is cached as it is)
        undated = head[:date_off] + head[date_off + len(date_b):]
        version = hashlib.blake2b(b"\0".join((
            (rel or name).encode("utf-8", "surrogateescape"), etag_b, b"%d" % st.st_ctime_ns, undated)),
            digest_size=8).digest()
        return {
            "data_id": int.from_bytes(version, "little"),
            "body_len": len(body),
            "flags": flags,
            "head_len": len(head),
            "date_off": date_off,
            "etag_off": etag_off,
            "etag_len": len(etag_b),
            "s304_off": [off for off, _ in slices],
            "s304_len": [n for _, n in slices],
            "csum": csum,
        }, stream


# what a hash map element costs beyond its key and value (struct htab_elem and the allocator's
# list node): used only when the kernel's memlock figure cannot be read
_HTAB_OVERHEAD = 56


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def _memlock(fd: int) -> int:
    """A BPF map's memlock figure, from /proc/self/fdinfo (0 when it cannot be read)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("memlock:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _event_fields(abi: Any) -> dict[str, int]:
    """Offsets of type, reason and the path key in a struct fs_event record, and its size."""
    def offset(fields: dict[str, Any]) -> int:
        image = abi.pack("struct fs_event", fields)
        return next(i for i, b in enumerate(image) if b)

    return {"type": offset({"type": 0xFFFFFFFF}), "reason": offset({"reason": 0xFFFFFFFF}),
            "key": offset({"key": {"path": b"\xff"}}), "size": abi.sizeof("struct fs_event")}


def kernel_dev(st_dev: int) -> int:
    """A device number as the kernel keeps it (dev_t: major << 20 | minor)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def _version(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _value_offset(head: bytes, name: bytes) -> int:
    """Offset of a header's value in a head built by response.head_bytes."""
    at = head.find(b"\r\n" + name + b": ")
    return -1 if at < 0 else at + len(name) + 4


def _without_date(head: bytes) -> bytes:
    """head with zero bytes in place of its Date value (what the entry's sums cover)."""
    at = _value_offset(head, b"Date")
    return head[:at] + bytes(DATE_LEN) + head[at + DATE_LEN:]


def _stream_len(entry: dict[str, Any]) -> int:
    """Bytes of an entry's file_data stream: the 200 head, then the body."""
    return entry["head_len"] + entry["body_len"]


STATUS_304 = response.status_line(304).encode("latin-1")


def _slices_304(head: bytes, head304: bytes, date_off: int, count: int) -> list[tuple[int, int]] | None:
    """How the program builds head304 from the 200 head: STATUS_304, then `count` (offset,
    length) slices of head, whole header lines each (unused ones empty), the Date in the first;
    None when it cannot (headers user space adds to a 304 and not to a 200, say).

    The result is checked byte for byte against head304, as is where its Date lands."""
    if not head304.startswith(STATUS_304):
        return None
    starts, at = [], head.find(b"\r\n") + 2  # the 200 head's lines after its status line
    while 0 < at < len(head):
        starts.append(at)
        at = head.find(b"\r\n", at) + 2
    slices, pos = [], len(STATUS_304)
    while pos < len(head304):
        end = head304.find(b"\r\n", pos) + 2
        line = head304[pos:end]
        start = next((i for i in starts if head.startswith(line, i)), None)
        if end < 2 or start is None or len(slices) == count:
            return None
        n = len(line)  # then as many of the following lines as go on alike
        while pos + n < len(head304) and start + n < len(head):
            nxt = head304.find(b"\r\n", pos + n) + 2
            if nxt < 2 or not head.startswith(head304[pos + n:nxt], start + n):
                break
            n = nxt - pos
        slices.append((start, n))
        pos += n
    slices += [(0, 0)] * (count - len(slices))
    built = STATUS_304 + b"".join(head[off:off + n] for off, n in slices)
    date = len(STATUS_304) + date_off - slices[0][0]
    if (built != head304 or not slices[0][0] <= date_off <= date_off + DATE_LEN <= sum(slices[0])
            or head304.find(b"\r\nDate: ") + 8 != date):
        return None
    return slices


def _has_encoded_sibling(path: Path | None) -> bool:
    """A precompressed variant beside the file (user space's PRECOMPRESSED suffixes): user
    space may answer it, and says Vary: Accept-Encoding on every answer."""
    if path is None:
        return False
    for _coding, suffix in _precompressed():
        sibling = path.with_name(path.name + suffix)
        try:
            if stat.S_ISREG(os.stat(sibling).st_mode) and not sibling.name.startswith("."):
                return True
        except OSError:
            continue
    return False


def _precompressed() -> tuple[tuple[str, str], ...]:
    """(coding, file suffix) pairs user space negotiates (http_semantics.PRECOMPRESSED)."""
    from .http_semantics import PRECOMPRESSED

    return PRECOMPRESSED


def _keepalive_timeout() -> float:
    """User space's keep-alive timeout, so both paths close idle connections alike."""
    try:
        from .server import KEEPALIVE_TIMEOUT
    except ImportError:
        return 15.0
    return float(KEEPALIVE_TIMEOUT)
