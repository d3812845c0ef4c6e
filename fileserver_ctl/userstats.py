"""User-space request counters shared by the server's worker processes through one mmap'd file.

Each worker owns one fixed-layout slot of u64 counters and is its only writer, so recording a
response is a few in-memory additions: no lock, no system call. Readers (`fsctl stats`, `fsctl top`,
the Prometheus collector) map the same file read-only and sum the slots. A reader may see one
response half-recorded (requests bumped, bytes not yet): fine for counters sampled once a second.

File layout (little-endian), /run/fileserver/<port>/userstats:
    header  (HEADER_SIZE bytes): magic, layout version, slot count, slot size, bucket count,
            server start time (wall clock, seconds), pid of the process that created it
    slot[i] (SLOT_SIZE bytes each, cache-line aligned so workers never share a line):
            requests, response bytes, latency sum (ns), responses 2xx 3xx 4xx 5xx,
            latency histogram (one count per LATENCY_BUCKETS bound, then +Inf)
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

RUN_ROOT = Path("/run/fileserver")
FILE_NAME = "userstats"

MAGIC = b"FSUSTAT\0"
VERSION = 1
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
# Upper bounds in seconds of the user-space latency histogram (Prometheus "le" values).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

HEADER = struct.Struct("<8sIIIIdQ")
HEADER_SIZE = 64
# Counter indexes inside a slot, in u64 units.
_REQUESTS, _BYTES, _LATENCY_NS, _CLASS0 = 0, 1, 2, 3
_BUCKET0 = _CLASS0 + len(STATUS_CLASSES)
SLOT_WORDS = _BUCKET0 + len(LATENCY_BUCKETS) + 1
SLOT = struct.Struct(f"<{SLOT_WORDS}Q")
SLOT_SIZE = (SLOT.size + 63) // 64 * 64

assert HEADER.size <= HEADER_SIZE and HEADER_SIZE % 8 == 0


def run_dir(port: int) -> Path:
    """Per-server run-time directory (user counters live here, next to nothing in bpffs)."""
    return RUN_ROOT / str(port)


def stats_path(port: int) -> Path:
    return run_dir(port) / FILE_NAME


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


@dataclass(frozen=True)
class UserTotals:
    """User-space counters summed over every worker slot."""

    requests: int = 0
    bytes: int = 0
    by_class: tuple[tuple[str, int], ...] = tuple((c, 0) for c in STATUS_CLASSES)
    # Non-cumulative counts per bucket: one per LATENCY_BUCKETS bound, then +Inf.
    latency_counts: tuple[int, ...] = (0,) * (len(LATENCY_BUCKETS) + 1)
    latency_sum: float = 0.0  # seconds

    def responses(self, status_class: str) -> int:
        return dict(self.by_class)[status_class]


class SlotRecorder:
    """Writes one worker's counters; `record` is cheap enough to call for every response."""

    __slots__ = ("_words", "_base")

    def __init__(self, words: memoryview, index: int) -> None:
        self._words = words
        self._base = index * (SLOT_SIZE // 8) + HEADER_SIZE // 8

    def record(self, status: int, nbytes: int, seconds: float) -> None:
        """Count one response: its status code, bytes sent and time taken to serve it."""
        w, b = self._words, self._base
        w[b + _REQUESTS] += 1
        if nbytes > 0:
            w[b + _BYTES] += nbytes
        if seconds > 0:
            w[b + _LATENCY_NS] += int(seconds * 1e9)
        else:
            seconds = 0.0
        cls = status // 100 - 2
        if 0 <= cls < len(STATUS_CLASSES):
            w[b + _CLASS0 + cls] += 1
        w[b + _BUCKET0 + bisect_left(LATENCY_BUCKETS, seconds)] += 1


class UserStats:
    """The shared counters file: `create` in the server's parent, `open` in any reader."""

    def __init__(self, path: Path, mm: mmap.mmap, owner_pid: int | None) -> None:
        self.path = path
        self._mm = mm
        self._words = memoryview(mm).cast("Q")
        self._owner_pid = owner_pid  # set only in the creating process: it removes the file
        magic, version, nslots, slot_size, nbuckets, start, pid = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or version != VERSION or slot_size != SLOT_SIZE or nbuckets != len(LATENCY_BUCKETS):
            self.close()
            raise ValueError(f"{path}: not a user-stats file of this version")
        if len(mm) < HEADER_SIZE + nslots * SLOT_SIZE:
            self.close()
            raise ValueError(f"{path}: truncated ({len(mm)} bytes for {nslots} slots)")
        self.workers = nslots
        self.start_time = start
        self.pid = pid

    @classmethod
    def create(cls, port: int, workers: int) -> UserStats:
        """Write a zeroed file for `workers` slots (replacing a stale one) and map it shared.

        The file is built under a temporary name and renamed into place, so a reader never sees
        it half-written. Forked workers inherit the mapping; spawned ones call `open(port)`.
        """
        if workers < 1:
            raise ValueError("workers must be at least 1")
        path = stats_path(port)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = HEADER_SIZE + workers * SLOT_SIZE
        image = bytearray(size)
        HEADER.pack_into(image, 0, MAGIC, VERSION, workers, SLOT_SIZE, len(LATENCY_BUCKETS),
                         time.time(), os.getpid())
        tmp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, image)
            os.replace(tmp, path)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return cls(path, mm, owner_pid=os.getpid())

    @classmethod
    def open(cls, port: int, *, writable: bool = False) -> UserStats:
        """Map an existing file; FileNotFoundError when no server created one for `port`.

        Readers map it read-only; a spawned worker passes writable=True to get its slot.
        """
        path = stats_path(port)
        flags, prot = (os.O_RDWR, mmap.PROT_READ | mmap.PROT_WRITE) if writable else (os.O_RDONLY, mmap.PROT_READ)
        fd = os.open(path, flags)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise ValueError(f"{path}: truncated ({size} bytes)")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        return cls(path, mm, owner_pid=None)

    def alive(self) -> bool:
        """Whether the process that created the file still runs (False after a crash)."""
        return pid_alive(self.pid)

    def slot(self, index: int) -> SlotRecorder:
        if not 0 <= index < self.workers:
            raise IndexError(f"worker slot {index} out of range 0..{self.workers - 1}")
        if self._words.readonly:
            raise PermissionError(f"{self.path} is mapped read-only")
        return SlotRecorder(self._words, index)

    def totals(self) -> UserTotals:
        words = [0] * SLOT_WORDS
        for i in range(self.workers):
            for k, v in enumerate(SLOT.unpack_from(self._mm, HEADER_SIZE + i * SLOT_SIZE)):
                words[k] += v
        return UserTotals(
            requests=words[_REQUESTS],
            bytes=words[_BYTES],
            by_class=tuple(zip(STATUS_CLASSES, words[_CLASS0:_BUCKET0])),
            latency_counts=tuple(words[_BUCKET0:]),
            latency_sum=words[_LATENCY_NS] / 1e9,
        )

    def close(self) -> None:
        """Unmap; the creating process also removes the file (forked workers never do)."""
        self._words.release()
        self._mm.close()
        if self._owner_pid is not None and self._owner_pid == os.getpid():
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass  # something else lives there too

    def __enter__(self) -> UserStats:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
