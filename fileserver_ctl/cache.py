"""What the kernel fast path may answer: file_cache/file_data entries built from response.py.

An entry holds the exact heads user space would send (response.file_head), where the Date and
ETag values sit in them, and the checksum of every payload variant, so the TC program only
copies bytes, writes the current Date and patches the checksum for it. Bodies live in file_data
in FS_CHUNK_SIZE pieces under an id derived from the file version, so every process that adds
the same version writes the same chunks, and a new version is complete before its entry points
at it; the old version's chunks go last.

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
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import hashlib
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
from .config import ABI_HEADER, Settings
from .keepalive import IdleCloser
from .retransmit import TimerKicks

CLOSE_HEADER = b"Connection: close\r\n"
INDEX = "index.html"
# Request-path characters the TC program takes as they are (bpf/http.bpf.h: PCHAR set); it
# hands off anything with "/." or "//", so such names are not worth caching.
_PLAIN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/")

COHERENCE_WITHOUT_FENTRY = (
    "inode ctime tracepoints (tp_btf, kernel >= 6.13) stop a changed file "
    "before the writer's call returns; read leases hold writers until the entry is dropped; "
    "inotify and a once-a-second re-check catch the rest")

log = logging.getLogger("fileserver.cache")

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
    process sent with forward().
    """

    def __init__(self, root: Path, changed: Any, forwarded: Any) -> None:
        self.root = root
        self._changed, self._forwarded = changed, forwarded
        self._owner = os.getpid()
        self._leases: dict[int, str] = {}       # fd -> rel
        self._dirs: dict[int, str] = {}         # inotify wd -> rel dir ("" is the docroot)
        self._watched: dict[str, int] = {}
        self._stop = threading.Event()
        self._lease_break = threading.Event()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._inotify = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe_r, self._pipe_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._pipe_w, False)
        self.leases = self._setup_leases()
        threading.Thread(target=self._watch_loop, name="cache-inotify", daemon=True).start()
        if self.leases:
            threading.Thread(target=self._lease_loop, name="cache-leases", daemon=True).start()

    def _setup_leases(self) -> bool:
        """Leases need the lease-break signal kept for our thread: block it (threads started
        later inherit that) and catch it in case an older thread is the one it lands on."""
        try:
            if Path("/proc/sys/fs/leases-enable").read_text().strip() == "0":
                return False
            signal.signal(LEASE_SIGNAL, lambda *_: self._lease_break.set())
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

    def lease(self, fd: int) -> bool | None:
        """Take a read lease on fd: True held, False refused (someone writes the file now),
        None when this file system or setup has no leases."""
        if not self.leases:
            return None
        try:
            fcntl.fcntl(fd, fcntl.F_SETSIG, LEASE_SIGNAL)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            return False if exc.errno in (errno.EAGAIN, errno.EBUSY) else None
        return True

    def hold(self, rel: str, fd: int | None) -> None:
        """Keep fd (leased) for rel and watch the directories on its path."""
        if fd is not None:
            self._leases[fd] = rel
        parts = rel.split("/")[:-1]
        for depth in range(len(parts) + 1):
            self._watch_dir("/".join(parts[:depth]))

    def release(self, rel: str) -> None:
        for fd, held in list(self._leases.items()):
            if held == rel:
                self._unlease(fd)

    def _unlease(self, fd: int) -> None:
        self._leases.pop(fd, None)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        except OSError:
            pass
        os.close(fd)

    def _watch_dir(self, rel_dir: str) -> None:
        if rel_dir in self._watched or self._inotify < 0:
            return
        path = os.fsencode(self.root / rel_dir if rel_dir else self.root)
        wd = self._libc.inotify_add_watch(self._inotify, path, WATCH_MASK)
        if wd >= 0:
            self._dirs[wd] = rel_dir
            self._watched[rel_dir] = wd

    def close(self) -> None:
        self._stop.set()
        for fd in list(self._leases):
            self._unlease(fd)

    # -- watcher threads --------------------------------------------------------------------

    def _lease_loop(self) -> None:
        while not self._stop.is_set():
            got = signal.sigtimedwait({LEASE_SIGNAL}, 0.2)
            if got is None and not self._lease_break.is_set():
                continue
            self._lease_break.clear()
            # siginfo does not name the fd in Python: find the leases being broken
            for fd, rel in list(self._leases.items()):
                try:
                    breaking = fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
                except OSError:
                    breaking = True
                if breaking:
                    self._changed(rel, False)  # drops the entry, then releases the lease

    def _watch_loop(self) -> None:
        buf = b""
        while not self._stop.is_set():
            ready = select.select([fd for fd in (self._inotify, self._pipe_r) if fd >= 0], [], [], 0.5)[0]
            if self._pipe_r in ready:
                buf += os.read(self._pipe_r, 65536)
                *lines, buf = buf.split(b"\n")
                for line in lines:
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
                self._dirs.pop(wd, None)
                self._watched.pop(rel_dir, None)
                continue
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                self._changed(rel_dir, True)
                continue
            rel = "/".join(p for p in (rel_dir, os.fsdecode(name)) if p)
            self._changed(rel, bool(mask & IN_ISDIR))


class KernelCache:
    """Fills, re-checks and invalidates the kernel's file cache; `maps` are the loaded maps."""

    def __init__(self, maps: Mapping[str, Any], settings: Settings) -> None:
        from .libbpf import Abi  # cffi stays inside libbpf.py

        self.abi = Abi(ABI_HEADER)
        self.settings = settings
        self.docroot = Path(settings.docroot).resolve()
        self._cache = maps["file_cache"]
        self._data = maps["file_data"]
        self._date = maps["http_date"]
        self._path_max = self.abi.const("FS_PATH_MAX")
        self._head_max = self.abi.const("FS_HEAD_MAX")
        self._chunk = self.abi.const("FS_CHUNK_SIZE")
        self._slot = self.abi.const("FS_DATE_SLOT")
        self._body_max = self.abi.const("FS_BODY_MAX")  # the kernel sends it in segments
        self._resp = self.abi.enum("fs_resp")
        self._encoded_flag = self.abi.enum("fs_entry_flags")["FS_ENTRY_F_ENCODED"]
        self._bytes: int | None = None  # body bytes cached, counted once then kept up to date
        self._lock = threading.RLock()   # the watcher threads invalidate concurrently
        self._held: set[str] = set()     # files this (owner) process has cached
        self._orphans: dict[str, bytes] = {}  # unlinked keys whose chunks remove() drops
        self._inodes: dict[tuple[int, int], set[str]] = {}  # (dev, ino) -> cached paths
        self._inode_map = maps.get("cached_inodes")
        self._watch = FileWatch(self.docroot, self._on_change, self.add)
        self._idle = IdleCloser(maps, self.abi, _keepalive_timeout()) if "conn_track" in maps else None
        # retransmission timers fire in the kernel but send through a test run from here
        self._kicks = TimerKicks.start(maps, self.abi, settings.interface, settings.port)

    # -- public API (contract 8) ---------------------------------------------------------

    def fill(self, docroot: str | os.PathLike[str] | None = None) -> int:
        """Cache every regular, non-hidden file under docroot that fits; returns how many."""
        root = Path(docroot).resolve() if docroot is not None else self.docroot
        count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    count += self.add((Path(dirpath) / name).relative_to(root).as_posix())
        return count

    def add(self, rel_path: str) -> bool:
        """Cache one file (path relative to the docroot); False when it is not cacheable.

        A file that is no longer cacheable (grown, gone, being written) leaves the cache. In a
        worker process the path is passed on to the process that owns the cache."""
        rel = rel_path.strip("/")
        if not self._watch.in_owner:
            return self._watch.forward(rel)
        with self._lock:
            built = self._build(rel)
            if built is None:
                self.remove(rel)
                return False
            entry, body, fd, st = built
            inode = (entry["dev"], entry["ino"])
            self._track_inode(rel, inode)  # before the entry: a change from now on is seen
            if self._install(rel, entry, body) and self._unchanged(rel, st):
                self._watch.release(rel)
                self._watch.hold(rel, fd)
                self._held.add(rel)
                return True
            if fd is not None:
                os.close(fd)
            self.remove(rel)
            return False

    def _track_inode(self, rel: str, inode: tuple[int, int]) -> None:
        """Put the file's inode in cached_inodes (the kernel deletes it when the inode
        changes) and remember which cached paths share it."""
        for other, paths in list(self._inodes.items()):
            if rel in paths and other != inode:
                self._untrack_inode(rel, other)
        self._inodes.setdefault(inode, set()).add(rel)
        if self._inode_map is not None:
            self._inode_map[self._inode_key(inode)] = (1).to_bytes(8, "little")

    def _untrack_inode(self, rel: str, inode: tuple[int, int]) -> None:
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

    def _install(self, rel: str, entry: dict[str, Any], body: bytes) -> bool:
        """Write the body's chunks, then the entries pointing at them, then drop old chunks."""
        self.cached_bytes()
        old = self._lookup(keys_for(rel)[0])
        grow = len(body) - (old["body_len"] if old else 0)
        if self.cached_bytes() + grow > self.settings.cache_size:
            return False
        try:
            for index, piece in enumerate(self._chunks(body)):
                self._data[self._data_key(entry["data_id"], index)] = piece
            value = self.abi.pack("struct fs_entry", entry)
            replaced = [self._lookup(key) for key in keys_for(rel)]
            for key in keys_for(rel):
                self._cache[self._path_key(key)] = value
        except OSError:  # a map is full: user space keeps serving it
            if not old or old["data_id"] != entry["data_id"]:
                self._drop_chunks(entry["data_id"], len(body))
            return False
        self._bytes = self.cached_bytes() + grow
        for old_entry in replaced:
            if old_entry and old_entry["data_id"] != entry["data_id"]:
                self._drop_chunks(old_entry["data_id"], old_entry["body_len"])
        return True

    def remove(self, rel_path: str) -> bool:
        """Stop answering a file in the kernel; True when it was cached."""
        rel = rel_path.strip("/")
        with self._lock:
            removed = self._remove(rel)
            if self._watch.in_owner:
                self._watch.release(rel)
                self._held.discard(rel)
                for inode, paths in list(self._inodes.items()):
                    if rel in paths:
                        self._untrack_inode(rel, inode)
            return removed

    def _remove(self, rel_path: str) -> bool:
        removed = False
        self.cached_bytes()
        for key in keys_for(rel_path):
            if not self._plain(key):
                continue  # never cached
            orphan = self._orphans.pop(key, None)
            if orphan is not None:
                old = self.abi.unpack("struct fs_entry", orphan)
            else:
                old = self._lookup(key)
                if old is None:
                    continue
                try:
                    del self._cache[self._path_key(key)]
                except KeyError:
                    continue
            removed = True
            if key == keys_for(rel_path)[0]:
                self._bytes = self.cached_bytes() - old["body_len"]
            self._drop_chunks(old["data_id"], old["body_len"])
        return removed

    def refresh_date(self, now: float | None = None) -> None:
        """Write the current Date value (the program patches it into every answer), then
        re-check the cached files; called once a second."""
        value = response.http_date(time.time() if now is None else now).encode()
        self._date[(0).to_bytes(4, "little")] = value.ljust(self._slot, b"\0")
        self.revalidate()
        if self._idle is not None and self._watch.in_owner:
            self._idle.close_idle()  # owned keep-alive connections time out like user space's

    def revalidate(self) -> int:
        """Re-read cached files whose version (ETag) or encodings changed, drop the ones that
        are gone; returns how many entries changed."""
        changed = 0
        if not self._watch.in_owner:
            return 0
        for rel, entry in self._cached_versions():
            path = self._resolve(rel)
            try:
                st = os.stat(path) if path is not None else None
            except OSError:
                st = None
            if (st is None or response.etag(st) != _etag_of(entry)
                    or bool(entry["flags"] & self._encoded_flag) != _has_encoded_sibling(path)
                    or not self._inode_current(entry)):
                self.add(rel)
                changed += 1
        return changed

    def entries(self) -> list[CachedFile]:
        """What file_cache holds now, sorted by path."""
        found = []
        for raw_key in list(self._cache):
            e = self._lookup_raw(raw_key)
            if e is None:
                continue
            found.append(CachedFile(path=raw_key.rstrip(b"\0").decode("latin-1"),
                                    size=e["body_len"], hits=e["hits"], etag=_etag_of(e)))
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

    def _on_change(self, rel: str, tree: bool) -> None:
        """A watcher saw rel (a file, or with tree=True a directory) change: drop what it may
        have made stale. Refilling waits for user space to serve the file again."""
        with self._lock:
            if tree:
                stale = {h for h in self._held if not rel or h == rel or h.startswith(rel + "/")}
            else:
                stale = {rel}
                for _coding, suffix in _precompressed():
                    if rel.endswith(suffix):
                        stale.add(rel[:-len(suffix)])  # Vary and the choice of coding change
            stale &= self._held
            # the program stops answering first (one delete per key), bookkeeping after
            for held in stale:
                for key in keys_for(held):
                    if self._plain(key):
                        self._unlink_key(key)
            for held in stale:
                self.remove(held)
                log.debug("kernel cache: dropped %s (changed on disk)", held)

    def cached_bytes(self) -> int:
        """Body bytes in the cache (each file once)."""
        if self._bytes is None:
            self._bytes = sum(e.size for e in self.entries() if not e.path.endswith("/"))
        return self._bytes

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
        self._orphans[key] = value

    def _lookup(self, key: str) -> dict[str, Any] | None:
        return self._lookup_raw(self._path_key(key))

    def _lookup_raw(self, raw_key: bytes) -> dict[str, Any] | None:
        try:
            return self.abi.unpack("struct fs_entry", self._cache[raw_key])
        except KeyError:
            return None

    def _chunks(self, body: bytes) -> Iterator[bytes]:
        for start in range(0, len(body), self._chunk):
            yield body[start:start + self._chunk].ljust(self._chunk, b"\0")

    def _drop_chunks(self, data_id: int, size: int) -> None:
        for index in range(-(-size // self._chunk)):
            try:
                del self._data[self._data_key(data_id, index)]
            except KeyError:
                pass

    def _cached_versions(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(rel path, entry) of every cached file, once per file."""
        seen = set()
        for raw_key in list(self._cache):
            rel = rel_for(raw_key.rstrip(b"\0").decode("latin-1"))
            if rel in seen:
                continue
            seen.add(rel)
            e = self._lookup_raw(raw_key)
            if e is not None:
                yield rel, e

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
        return real

    def _build(self, rel: str) -> tuple[dict[str, Any], bytes, int | None, os.stat_result] | None:
        """(entry, body, leased fd or None, stat) for rel, or None when it cannot be cached."""
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
            leased = self._watch.lease(fd)  # before reading: a write from now on waits for us
            if leased is False:
                return None  # open for writing right now
            body = os.read(fd, st.st_size + 1) if st.st_size else b""
            after = os.fstat(fd)
            if len(body) != st.st_size or after.st_mtime_ns != st.st_mtime_ns:
                return None  # written while we read: user space serves it until it settles
            built = self.entry_for(Path(rel).name, st, body, encoded=_has_encoded_sibling(path))
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
                os.close(fd)

    def entry_for(self, name: str, st: os.stat_result, body: bytes,
                  date: str | None = None, *, encoded: bool = False,
                  ) -> tuple[dict[str, Any], bytes] | None:
        """struct fs_entry fields answering file `name` (stat `st`) with `body`; None if the
        heads do not fit or do not have the shape the program relies on."""
        date = date or response.http_date(time.time())
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
        date_off, date304_off = _value_offset(head, b"Date"), _value_offset(head304, b"Date")
        etag_off = _value_offset(head, b"ETag")
        if (head[date_off:date_off + len(date_b)] != date_b
                or head304[date304_off:date304_off + len(date_b)] != date_b
                or head[etag_off:etag_off + len(etag_b)] != etag_b):
            return None
        payloads = {
            "FS_RESP_GET": head + body,
            "FS_RESP_GET_CLOSE": heads[200, True] + body,
            "FS_RESP_HEAD": head,
            "FS_RESP_HEAD_CLOSE": heads[200, True],
            "FS_RESP_304": head304,
            "FS_RESP_304_CLOSE": heads[304, True],
        }
        csum = [0] * self._resp["FS_RESP_MAX"]
        for variant, payload in payloads.items():
            csum[self._resp[variant]] = payload_sum(payload)
        version = hashlib.blake2b(name.encode("utf-8", "surrogateescape") + etag_b + head,
                                  digest_size=8).digest()
        return {
            "data_id": int.from_bytes(version, "little"),
            "body_len": len(body),
            "flags": self._encoded_flag if vary else 0,
            "head_len": len(head),
            "head304_len": len(head304),
            "date_off": date_off,
            "date304_off": date304_off,
            "etag_off": etag_off,
            "etag_len": len(etag_b),
            "csum": csum,
            "date": date_b,
            "head": head,
            "head304": head304,
        }, body


def kernel_dev(st_dev: int) -> int:
    """A device number as the kernel keeps it (dev_t: major << 20 | minor)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def _version(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _value_offset(head: bytes, name: bytes) -> int:
    """Offset of a header's value in a head built by response.head_bytes."""
    at = head.find(b"\r\n" + name + b": ")
    return -1 if at < 0 else at + len(name) + 4


def _etag_of(entry: dict[str, Any]) -> str:
    start = entry["etag_off"]
    return entry["head"][start:start + entry["etag_len"]].decode("latin-1")


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
