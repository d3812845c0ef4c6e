"""Counters of a running server -> one frozen Snapshot; rates between two; JSON for `fsctl stats`.

Sources, all read from another process than the server's:
- kernel counters: the pinned per-CPU `stats` map, summed over CPUs, named from `enum fs_stat`
  in bpf/fileserver.h (lower-cased, without the FS_STAT_ prefix) — never from a copied list;
- user-space counters: the workers' shared file (userstats.py);
- cache contents and per-file hits: the pinned `file_cache` map; the cache's budget, memory and
  admission counts: the figures its owner publishes once a second (cache.state_path), with the
  maps' memlock figures read live;
- live connections by state: `conn_track`;
- top clients: XDP's per-client `client_stats`, decoded by policy.read_clients() (empty when the
  server has no such map: an older object);
- BPF program run counts and run time: `bpftool prog show`, for every program of the server's
  object (the kernel counts only while kernel.bpf_stats_enabled is on, see bpf_stats()).
"""

from __future__ import annotations

import contextlib
import functools
import json
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from . import config
from .policy import CLIENT_MAP, ClientFigures, read_clients
from .userstats import LATENCY_BUCKETS, STATUS_CLASSES, UserStats, UserTotals, pid_alive

STAT_PREFIX = "FS_STAT_"
# Families of fs_stat counters, by the prefix of their names in the enum (a reason is the rest):
HANDOFF_PREFIX = "handoff_"  # FS_STAT_HANDOFF_<reason>: a request handed to the TCP stack
HANDOFF_FAILED = "handoff_failed"  # ...except this one: the hand-off itself failed, segment dropped
XDP_DROP_PREFIX = "xdp_drop_"  # FS_STAT_XDP_DROP_<reason>: dropped by the XDP policy
BPF_STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
TOP_N = 5


class NoServerError(LookupError):
    """No file server runs on the asked port; str() is the one line a user sees."""

    def __init__(self, port: int, detail: str = "") -> None:
        super().__init__(f"no file server running on port {port}{detail}")
        self.port = port


@dataclass(frozen=True)
class FileHits:
    path: str
    hits: int
    size: int  # body bytes held in the kernel cache


@dataclass(frozen=True)
class ProgramStats:
    id: int
    name: str
    run_cnt: int  # counted only while kernel.bpf_stats_enabled is on
    run_time_ns: int
    type: str = ""  # bpftool's name for the program type: sched_cls, xdp, tracing...


@dataclass(frozen=True)
class Snapshot:
    """Every figure of one server at one instant; cumulative since the server started."""

    port: int
    monotonic: float  # time.monotonic() when taken, for rates()
    uptime: float  # seconds since the server started
    kernel_path: bool  # False when the server runs without the fast path (-n)
    counters: Mapping[str, int]  # every fs_stat counter, in enum order, summed over CPUs
    kernel_responses: int
    kernel_bytes: int
    kernel_by_class: tuple[tuple[str, int], ...]  # ("2xx", n), ("3xx", n), ...
    handed_off: int  # connections handed to the kernel's TCP stack so far
    user: UserTotals = UserTotals()
    cached_files: int = 0
    cached_bytes: int = 0
    connections: Mapping[str, int] = field(default_factory=dict)  # live conn_track entries by state
    top_files: tuple[FileHits, ...] = ()
    cache: Mapping[str, Any] = field(default_factory=dict)  # cache_json(): budget, memory, hits per file
    top_clients: tuple[ClientFigures, ...] = ()  # from client_stats, busiest first
    programs: tuple[ProgramStats, ...] = ()

    @property
    def user_responses(self) -> int:
        return self.user.requests

    @property
    def connections_owned(self) -> int:
        """Connections the kernel path answers on now (tracked and not handed off)."""
        return sum(n for state, n in self.connections.items() if state != "handed_off")


@dataclass(frozen=True)
class Rates:
    """Per-second figures between two snapshots of the same server."""

    seconds: float
    kernel_rps: float
    user_rps: float
    kernel_bps: float
    user_bps: float
    counters: Mapping[str, float] = field(default_factory=dict)
    # program id -> (runs per second, average ns per run over the interval or None)
    programs: Mapping[int, tuple[float, float | None]] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float | None:
        """Share of requests the kernel cache answered in the interval (None when idle)."""
        total = self.kernel_rps + self.user_rps
        return self.kernel_rps / total if total else None


def by_reason(counters: Mapping[str, int], prefix: str, *, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """The counters named `prefix`<reason> as reason -> count, in enum order."""
    return {name.removeprefix(prefix): n for name, n in counters.items()
            if name.startswith(prefix) and name not in exclude}


def handoffs_by_reason(counters: Mapping[str, int]) -> dict[str, int]:
    """Requests handed to the kernel's TCP stack, by why (FS_STAT_HANDOFF_*, not the failures)."""
    return by_reason(counters, HANDOFF_PREFIX, exclude=(HANDOFF_FAILED,))


def xdp_drops(counters: Mapping[str, int]) -> dict[str, int]:
    """Segments the XDP policy dropped, by why (FS_STAT_XDP_DROP_*: deny list, SYN rate...)."""
    return by_reason(counters, XDP_DROP_PREFIX)


def hit_rate(snap: Snapshot) -> float | None:
    """Share of all requests since start that the kernel cache answered."""
    total = snap.kernel_responses + snap.user_responses
    return snap.kernel_responses / total if total else None


def rates(prev: Snapshot, cur: Snapshot) -> Rates:
    """Per-second figures from prev to cur; counters that went backwards count as zero."""
    dt = max(cur.monotonic - prev.monotonic, 1e-6)

    def per_s(a: int, b: int) -> float:
        return max(b - a, 0) / dt

    progs: dict[int, tuple[float, float | None]] = {}
    before = {p.id: p for p in prev.programs}
    for p in cur.programs:
        if (q := before.get(p.id)) is None:
            continue  # loaded since: no interval to measure
        runs = max(p.run_cnt - q.run_cnt, 0)
        spent = max(p.run_time_ns - q.run_time_ns, 0)
        progs[p.id] = (runs / dt, spent / runs if runs else None)
    return Rates(
        seconds=dt,
        kernel_rps=per_s(prev.kernel_responses, cur.kernel_responses),
        user_rps=per_s(prev.user_responses, cur.user_responses),
        kernel_bps=per_s(prev.kernel_bytes, cur.kernel_bytes),
        user_bps=per_s(prev.user.bytes, cur.user.bytes),
        counters={k: per_s(prev.counters.get(k, 0), v) for k, v in cur.counters.items()},
        programs=progs,
    )


def to_json(snap: Snapshot) -> dict[str, Any]:
    """Machine-readable figures: derived totals, then every fs_stat counter under its own name."""
    out: dict[str, Any] = {
        "port": snap.port,
        "uptime_seconds": round(snap.uptime, 3),
        "kernel_path": snap.kernel_path,
        "kernel_responses": snap.kernel_responses,
        "kernel_bytes": snap.kernel_bytes,
        "user_responses": snap.user_responses,
        "user_bytes": snap.user.bytes,
        "responses_by_class": {
            "kernel": dict(snap.kernel_by_class),
            "user": dict(snap.user.by_class),
        },
        "user_latency_seconds": {
            "buckets": {str(le): n for le, n in zip((*LATENCY_BUCKETS, "+Inf"), snap.user.latency_counts)},
            "sum": snap.user.latency_sum,
        },
        "hit_rate": hit_rate(snap),
        "cached_files": snap.cached_files,
        "cached_bytes": snap.cached_bytes,
        "connections_owned": snap.connections_owned,
        "connections": dict(snap.connections),
        "handed_off": snap.handed_off,
        "handoffs_by_reason": handoffs_by_reason(snap.counters),
        "xdp_drops": xdp_drops(snap.counters),
        "top_files": [asdict(f) for f in snap.top_files],
        "cache": dict(snap.cache),
        "top_clients": [_client_json(c) for c in snap.top_clients],
        "programs": [asdict(p) for p in snap.programs],
    }
    clash = out.keys() & snap.counters.keys()
    assert not clash, f"fs_stat counters clash with derived keys: {clash}"
    out.update(snap.counters)
    return out


def _client_json(c: ClientFigures) -> dict[str, Any]:
    out = asdict(c)
    out["last_seen"], out["first_seen"] = round(c.last_seen, 3), round(c.first_seen, 3)
    return out


# --- reading a live server --------------------------------------------------------------------

@functools.cache
def _abi(header: Path) -> Any:
    from .libbpf import Abi

    return Abi(header)


def counter_names(abi: Any) -> dict[str, int]:
    """fs_stat counter name (lower case, no FS_STAT_ prefix) -> index, in enum order."""
    return {name.removeprefix(STAT_PREFIX).lower(): value
            for name, value in abi.enum("fs_stat").items() if name != STAT_PREFIX + "MAX"}


def sum_percpu(values: list[bytes] | bytes) -> int:
    """A per-CPU __u64 counter summed over every possible CPU."""
    if isinstance(values, bytes):
        values = [values]
    return sum(int.from_bytes(v[:8], sys.byteorder) for v in values)


def _bpftool_json(*args: str) -> Any:
    try:
        out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        return json.loads(out.stdout)
    except ValueError:
        return None


def programs_of(map_pin: Path) -> tuple[ProgramStats, ...]:
    """Run counts of every program of the object whose map is pinned at `map_pin` (this server's):
    the packet programs and whatever else the object loads (e.g. the tp_btf cache-coherence ones).

    One load of an object shares one BTF object, so its programs are those with the map's
    btf_id; a program that uses the map itself counts too. Nothing here names a program, so a
    program added to the object shows up without a change. bpftool resolves full names from BTF
    (the kernel keeps 15 characters) and omits run_cnt/run_time_ns while they are zero. Empty
    when bpftool is missing.
    """
    info = _bpftool_json("map", "show", "pinned", str(map_pin))
    if not isinstance(info, dict) or "id" not in info:
        return ()
    btf_id = info.get("btf_id") or None  # 0: a map without BTF
    progs = _bpftool_json("prog", "show")
    if not isinstance(progs, list):
        return ()
    return tuple(sorted(
        (ProgramStats(p["id"], p.get("name", "?"), p.get("run_cnt", 0), p.get("run_time_ns", 0), p.get("type", ""))
         for p in progs
         if (btf_id is not None and p.get("btf_id") == btf_id) or info["id"] in p.get("map_ids", ())),
        key=lambda p: (p.name, p.id)))


@contextlib.contextmanager
def bpf_stats() -> Iterator[bool]:
    """Turn on kernel.bpf_stats_enabled (per-program run counts and time) for the duration only.

    It costs a clock read per program run, so it is left as found afterwards, as bpftop does.
    Yields whether stats are on. Two `fsctl top` at once: the first to exit turns it off.
    """
    try:
        before = BPF_STATS_SYSCTL.read_text().strip()
    except OSError:
        yield False
        return
    changed = False
    if before == "0":
        try:
            BPF_STATS_SYSCTL.write_text("1")
            changed = True
        except OSError:
            yield False
            return
    try:
        yield True
    finally:
        if changed:
            with contextlib.suppress(OSError):
                BPF_STATS_SYSCTL.write_text(before)


class FieldReader:
    """Reads a few fields of one struct straight from bytes: Abi.unpack decodes every field, far
    too slow for a 65,536-entry conn_track walked every second.

    Offsets and sizes are found from the header itself (each field packed with every bit set),
    so nothing about the layout is copied here.
    """

    _FORMATS = {1: "B", 2: "H", 4: "I", 8: "Q"}

    def __init__(self, abi: Any, ctype: str, fields: tuple[str, ...]) -> None:
        self._spans = {name: self._span(abi, ctype, name) for name in fields}
        self._scalars = {name: struct.Struct("=" + self._FORMATS[size]) for name, (_, size, array) in
                         self._spans.items() if not array}

    @staticmethod
    def _span(abi: Any, ctype: str, name: str) -> tuple[int, int, bool]:
        """(offset, size, is_array) of one field."""
        for size in (8, 4, 2, 1):
            try:
                image = abi.pack(ctype, {name: (1 << 8 * size) - 1})
            except OverflowError:
                continue
            except TypeError:
                break  # an array: measured below
            return next(i for i, b in enumerate(image) if b), size, False
        size = 1
        while True:  # the longest byte string the array takes
            try:
                abi.pack(ctype, {name: b"\xff" * (size + 1)})
            except ValueError:
                break
            size += 1
        image = abi.pack(ctype, {name: b"\xff" * size})
        return next(i for i, b in enumerate(image) if b), size, True

    def get(self, data: bytes, name: str) -> Any:
        offset, size, array = self._spans[name]
        if array:
            return data[offset:offset + size]
        return self._scalars[name].unpack_from(data, offset)[0]


@functools.cache
def _conn_reader(header: Path) -> FieldReader:
    return FieldReader(_abi(header), "struct fs_conn", ("state", "last_seen_ns"))


def _kernel_owner_alive(port: int) -> bool:
    """Whether the process kernel.py recorded as owning the port's kernel state still runs.

    Reads the pid from the run-state file rather than probing its flock, which a starting
    server would take for a running one.
    """
    from .kernel import state_path

    try:
        pid = int(json.loads(state_path(port).read_text()).get("pid") or 0)
    except (OSError, ValueError, AttributeError):
        return False
    return pid > 0 and pid_alive(pid)


def _map_items(m: Any, limit: int) -> Iterator[tuple[bytes, Any]]:
    """Up to `limit` (key, value) pairs; entries deleted while we walk are skipped."""
    for n, key in enumerate(m):
        if n >= limit:
            return
        try:
            yield key, m[key]
        except KeyError:
            continue


class StatsReader:
    """Reads snapshots of the server on `port` from another process, again and again.

    Maps are opened from their pins on every read, so a server restarted in between is picked
    up; the ABI header is parsed once.
    """

    def __init__(self, port: int, *, header: Path = config.ABI_HEADER, programs: bool = True,
                 top: int = TOP_N, walk_limit: int = 1 << 17) -> None:
        self.port = port
        self.header = Path(header)
        self.programs = programs
        self.top = top
        self.walk_limit = walk_limit  # bounds a walk over conn_track / file_cache / client_stats

    def _user(self) -> tuple[UserTotals, float | None, bool | None]:
        """User totals, server start time, and liveness (None: no user-stats file)."""
        try:
            us = UserStats.open(self.port)
        except (FileNotFoundError, ValueError):
            return UserTotals(), None, None
        try:
            return us.totals(), us.start_time, us.alive()
        finally:
            us.close()

    def read(self) -> Snapshot:
        pins = config.pin_dir(self.port)
        stats_pin = pins / "stats"
        user, started, alive = self._user()
        kernel_path = stats_pin.exists()
        # The user-stats file names the server's pid; without one (a server that does not write
        # it), the kernel path's run-state file does. Pins alone may be a crash's leftovers.
        if alive is None:
            alive = kernel_path and _kernel_owner_alive(self.port)
        if not alive:
            raise NoServerError(self.port)
        if started is None:
            started = stats_pin.stat().st_mtime
        now = time.monotonic()
        uptime = max(time.time() - started, 0.0)
        if not kernel_path:
            return Snapshot(port=self.port, monotonic=now, uptime=uptime, kernel_path=False,
                            counters={}, kernel_responses=0, kernel_bytes=0,
                            kernel_by_class=tuple((c, 0) for c in STATUS_CLASSES), handed_off=0, user=user)
        return self._kernel_snapshot(pins, now, uptime, user)

    def _kernel_snapshot(self, pins: Path, now: float, uptime: float, user: UserTotals) -> Snapshot:
        from .libbpf import Map

        abi = _abi(self.header)
        try:
            with Map.from_pin(pins / "stats") as m:
                # a server loaded from an older object has fewer counters than the header names
                counters = {name: sum_percpu(m[struct.pack("=I", idx)])
                            for name, idx in counter_names(abi).items() if idx < m.max_entries}
            files, cached_bytes = self._files(Map, pins / "file_cache", abi)
            cache = cache_json(self.port, files, _memlock_of(Map, pins / "file_cache", pins / "file_data",
                                                             *sorted(pins.glob("file_tail_*"))))
            conns = self._connections(Map, pins / "conn_track", abi)
            clients = self._clients(Map, pins / CLIENT_MAP, abi)
        except FileNotFoundError:
            raise NoServerError(self.port, " (it stopped while being read)") from None
        responses = counters.get("responses", 0)
        not_modified = counters.get("not_modified", 0)
        return Snapshot(
            port=self.port, monotonic=now, uptime=uptime, kernel_path=True, counters=counters,
            kernel_responses=responses,
            kernel_bytes=counters.get("response_bytes", 0),
            kernel_by_class=(("2xx", responses - not_modified), ("3xx", not_modified), ("4xx", 0), ("5xx", 0)),
            handed_off=sum(handoffs_by_reason(counters).values()),
            user=user,
            cached_files=len(_without_aliases(files)),
            cached_bytes=cached_bytes,
            cache=cache,
            connections=conns,
            top_files=tuple(sorted(files, key=lambda f: (-f.hits, f.path))[: self.top]),
            top_clients=clients,
            programs=programs_of(pins / "stats") if self.programs else (),
        )

    def _files(self, Map: Any, pin: Path, abi: Any) -> tuple[list[FileHits], int]:
        """Every file_cache entry, and the body bytes of the files (a directory's "/" entry
        is its index.html's alias, not counted twice)."""
        files = []
        with Map.from_pin(pin) as m:
            for key, value in _map_items(m, self.walk_limit):
                entry = abi.unpack("struct fs_entry", value)
                path = abi.unpack("struct fs_path_key", key)["path"].split(b"\0", 1)[0]
                files.append(FileHits(path.decode("utf-8", "backslashreplace"), entry["hits"], entry["body_len"]))
        return files, sum(f.size for f in _without_aliases(files))

    def _connections(self, Map: Any, pin: Path, abi: Any) -> dict[str, int]:
        """Live conn_track entries by state (enum fs_conn_state).

        Entries idle longer than FS_CONN_IDLE_NS are dead (the program reuses them) and skipped.
        """
        states = {v: k.removeprefix("FS_CONN_").lower() for k, v in abi.enum("fs_conn_state").items()}
        by_state = dict.fromkeys(states.values(), 0)
        try:
            idle_ns = abi.const("FS_CONN_IDLE_NS")
        except KeyError:
            idle_ns = None
        now_ns = time.monotonic_ns()  # bpf_ktime_get_ns() is CLOCK_MONOTONIC too
        conn_reader = _conn_reader(self.header)
        with Map.from_pin(pin) as m:
            for _, value in _map_items(m, self.walk_limit):
                if idle_ns is not None and now_ns - conn_reader.get(value, "last_seen_ns") > idle_ns:
                    continue
                state = states.get(conn_reader.get(value, "state"), "unknown")
                by_state[state] = by_state.get(state, 0) + 1
        return by_state

    def _clients(self, Map: Any, pin: Path, abi: Any) -> tuple[ClientFigures, ...]:
        """The busiest clients XDP counted in client_stats; none when the object has no such map."""
        try:
            m = Map.from_pin(pin)
        except FileNotFoundError:
            return ()  # an object from before the per-client figures
        with m:
            return tuple(read_clients(m, abi, limit=self.walk_limit)[: self.top])


CACHE_FILES_SHOWN = 1000  # hits per file in the JSON: the busiest this many entries


def _without_aliases(files: list[FileHits]) -> list[FileHits]:
    """The entries but a directory's ("/a/"), which stands for its index.html's when that has
    its own entry: each file once."""
    paths = {f.path for f in files}
    return [f for f in files if not (f.path.endswith("/") and f.path + "index.html" in paths)]


def _memlock_of(Map: Any, *pins: Path) -> int | None:
    """The summed memlock figures of the maps pinned at `pins` (None when unreadable)."""
    total = 0
    for pin in pins:
        try:
            with Map.from_pin(pin) as m:
                text = Path(f"/proc/self/fdinfo/{m.fd}").read_text()
        except OSError:
            return None
        found = [line.split()[1] for line in text.splitlines() if line.startswith("memlock:")]
        if not found:
            return None
        total += int(found[0])
    return total


def cache_json(port: int, files: list[FileHits], memlock: int | None) -> dict[str, Any]:
    """The kernel cache: what its owner published (budget, use, admissions), the maps' memlock
    growth over empty and per cached body byte, and hits per file, busiest first."""
    from .cache import state_path

    try:
        published = json.loads(state_path(port).read_text())
    except (OSError, ValueError):
        published = {}
    pid = published.get("pid") if isinstance(published, dict) else None
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        published = {}  # left by a server that is gone
    out: dict[str, Any] = {"entries": len(files)}
    out.update({k: v for k, v in published.items() if k != "pid"})
    empty = published.get("maps_memlock_empty")
    if memlock is not None and empty is not None:
        body = sum(f.size for f in _without_aliases(files))
        out["memlock_bytes"] = memlock - empty
        out["memlock_per_byte"] = round((memlock - empty) / body, 3) if body else None
    out["hits"] = [asdict(f) for f in sorted(files, key=lambda f: (-f.hits, f.path))[:CACHE_FILES_SHOWN]]
    return out


def read_snapshot(port: int, **kw: Any) -> Snapshot:
    """One snapshot of the server on `port`; NoServerError when none runs there."""
    return StatsReader(port, **kw).read()


def stats_json(port: int) -> str:
    """`fsctl stats --json`: the snapshot as indented JSON text."""
    return json.dumps(to_json(read_snapshot(port)), indent=2)
