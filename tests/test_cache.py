"""KernelCache with the real object's maps: memory as the kernel counts it, the policy's fill
order and budget, misses from hand-off events, eviction, settling, unreadable files; then
`fsctl up --cache-size` end to end (a hot file displaces a cold one; fsctl stats shows it)."""

from __future__ import annotations

import json
import os
import re
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest

from fileserver_ctl import config, libbpf
from fileserver_ctl.cache import KernelCache, keys_for
from fileserver_ctl.cache_policy import allocation
from fileserver_ctl.config import Settings

pytestmark = pytest.mark.bpf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from stale_window import Pins, _read_reply, fsctl_up  # noqa: E402
from servers import pick_port  # noqa: E402

PORTS = range(18500, 18530)
PORT = 18529  # the loaded-only object's server_port (nothing is attached)
# the kmalloc size classes of a file_cache element (64-byte key, fs_entry: 200 bytes), of a
# file_data element (FS_CHUNK_SIZE makes it exactly 2,048 bytes) and of a file_tail_440 element
# (exactly 512: a small file's whole stream) on this kernel
ENTRY_UNIT, CHUNK_UNIT, TAIL_UNIT = 256, 2048, 512
FILE_UNIT = ENTRY_UNIT + TAIL_UNIT  # a small file (head and body under 440 bytes) under one path
PATH_MAX = 64  # bpf/fileserver.h FS_PATH_MAX: the file_cache key


@pytest.fixture(scope="module")
def maps(real_bpf_object: Path) -> Iterator[dict]:
    obj = libbpf.BpfObject.open(real_bpf_object)
    obj.set_rodata("server_port", PORT.to_bytes(2, "little"))
    for prog in obj.programs():
        if prog.name.startswith("fileserver_ctime"):
            prog.set_autoload(False)  # nothing is attached here anyway
    obj.load()
    yield obj.maps()
    obj.close()


@pytest.fixture
def make_cache(maps: dict, tmp_path: Path) -> Iterator:
    """make_cache(files, budget=...) -> KernelCache over emptied maps and a docroot of files."""
    made: list[KernelCache] = []

    def make(files: dict[str, bytes], budget: int = 64 << 20, fill: bool = True, **kw) -> KernelCache:
        for name in (*STREAM_MAPS, "cached_inodes"):
            for key in list(maps[name]):
                del maps[name][key]
        docroot = tmp_path / f"www{len(made)}"
        docroot.mkdir()
        for name, data in files.items():
            (docroot / name).parent.mkdir(parents=True, exist_ok=True)
            (docroot / name).write_bytes(data)
        cache = KernelCache(maps, Settings(docroot=docroot, port=PORT, cache_size=budget), **kw)
        made.append(cache)
        if fill:
            cache.fill()
        return cache

    yield make
    for cache in made:
        cache.close()


STREAM_MAPS = ("file_cache", "file_data", *(f"file_tail_{cap}" for cap in (184, 440, 952, 1232, 1480, 1728)))


def elements(maps: dict) -> int:
    """Chunks of every stream: file_data's and the tail maps' elements."""
    return sum(len(maps[name]) for name in STREAM_MAPS[1:])


def keys(maps: dict) -> set[str]:
    return {k.rstrip(b"\0").decode() for k in maps["file_cache"]}


def entry_of(cache: KernelCache, maps: dict, key: str) -> dict:
    return cache.abi.unpack("struct fs_entry", maps["file_cache"][key.encode().ljust(PATH_MAX, b"\0")])


def stream_of(cache: KernelCache, maps: dict, key: str) -> bytes:
    """The file_data stream of key's entry: the 200 head, then the body."""
    e = entry_of(cache, maps, key)
    n = e["head_len"] + e["body_len"]
    chunk = cache.abi.const("FS_CHUNK_SIZE")
    return b"".join(cache._map_of(n, i)[0][cache._data_key(e["data_id"], i)]
                    for i in range(-(-n // chunk)))[:n]


def body_of(cache: KernelCache, maps: dict, key: str) -> bytes:
    """The body the kernel would send for key, read back from file_data."""
    e = entry_of(cache, maps, key)
    return stream_of(cache, maps, key)[e["head_len"]:]


def cached_body(cache: KernelCache, maps: dict, key: str) -> bytes | None:
    """body_of, or None while key is not cached: for conditions polled while the cache swaps
    versions (an entry found may be gone by the time its chunks are read)."""
    try:
        return body_of(cache, maps, key)
    except KeyError:
        return None


def handoff_event(cache: KernelCache, path: str, reason: str = "FS_STAT_HANDOFF_MISS") -> bytes:
    return cache.abi.pack("struct fs_event", {
        "type": cache.abi.enum("fs_event_type")["FS_EVENT_HANDOFF"],
        "reason": cache.abi.enum("fs_stat")[reason], "key": {"path": path.encode()}})


def wait_for(condition, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


# --- memory ---------------------------------------------------------------------------------

def test_elements_cost_what_the_kernel_counts(make_cache, maps):
    cache = make_cache({"a.txt": b"x" * 100})
    assert maps["file_cache"].key_size == PATH_MAX == cache.abi.const("FS_PATH_MAX")
    entry, chunk = cache.layout.entry_element, cache.layout.chunk_element
    chunk_size = cache.abi.const("FS_CHUNK_SIZE")
    # the kernel's per-element overhead is the same in both maps
    assert entry - PATH_MAX - maps["file_cache"].value_size == chunk - 16 - chunk_size > 0
    assert cache.memlock() - cache._memlock_empty == entry + cache.layout.tail_elements[1] == cache.policy.memlock()
    # a file_data element is exactly a size class: nothing of what it is given is wasted
    assert chunk == allocation(chunk) == CHUNK_UNIT and allocation(entry) == ENTRY_UNIT
    tails = cache.layout.tail_elements
    assert [allocation(t) for t in tails[:3]] == list(tails[:3]) == [256, 512, 1024]
    assert [t - cap for t, cap in zip(tails, cache.layout.tail_caps)] == [chunk - chunk_size] * len(tails)
    assert cache.policy.used == FILE_UNIT and len(maps["file_tail_440"]) == 1 and not len(maps["file_data"])


def test_a_version_is_one_stream_of_head_then_body(make_cache, maps):
    """The 200 head, then the body: the head user space sends, where the entry says (the program
    copies it from chunk 0); the 304 head is its status line and slices of the 200 head."""
    from fileserver_ctl import response

    body = random.Random(7).randbytes(5000)
    cache = make_cache({"page.html": body})
    e = entry_of(cache, maps, "/page.html")
    stream = stream_of(cache, maps, "/page.html")
    st = (cache.docroot / "page.html").stat()
    date = stream[e["date_off"]:e["date_off"] + response.DATE_LEN].decode()
    head304, head = (response.file_head(s, st, "page.html", date) for s in (304, 200))
    assert e["head_len"] <= cache.abi.const("FS_CHUNK_SIZE")
    assert stream == head + body
    assert (e["head_len"], e["body_len"]) == (len(head), len(body))
    assert stream[e["etag_off"]:e["etag_off"] + e["etag_len"]].decode() == response.etag(st)
    assert not e["flags"] & cache.abi.enum("fs_entry_flags")["FS_ENTRY_F_NO_304"]
    built = b"HTTP/1.1 304 Not Modified\r\n" + b"".join(
        stream[off:off + n] for off, n in zip(e["s304_off"], e["s304_len"]))
    assert built == head304
    at = len(b"HTTP/1.1 304 Not Modified\r\n") + e["date_off"] - e["s304_off"][0]
    assert built[at:at + len(date)].decode() == date
    assert elements(maps) == -(-len(stream) // cache.abi.const("FS_CHUNK_SIZE"))
    assert len(maps["file_data"]) == len(stream) // cache.abi.const("FS_CHUNK_SIZE")  # the tail apart


@pytest.mark.parametrize("vary", [False, True], ids=["plain", "vary"])
def test_304_heads_are_slices_of_the_200_head(vary: bool, tmp_path: Path):
    """Every 304 head user space makes is the status line and at most FS_304_SLICES slices of
    its 200 head (Vary included); a 304 head with a line the 200 head lacks is refused, and the
    entry then says FS_ENTRY_F_NO_304."""
    from fileserver_ctl import response
    from fileserver_ctl.cache import STATUS_304, _slices_304

    f = tmp_path / "a.css"
    f.write_bytes(b"x" * 10)
    st = f.stat()
    date = response.http_date(st.st_mtime + 60)  # later than the mtime, as the Date is
    head = response.file_head(200, st, "a.css", date, vary=vary)
    head304 = response.file_head(304, st, "a.css", date, vary=vary)
    slices = _slices_304(head, head304, head.index(b"Date: ") + 6, 3)
    assert slices is not None and len(slices) == 3
    assert STATUS_304 + b"".join(head[o:o + n] for o, n in slices) == head304
    odd = head304[:-2] + b"X-Only-In-304: 1\r\n\r\n"
    assert _slices_304(head, odd, head.index(b"Date: ") + 6, 3) is None
    assert _slices_304(head, head304, head.index(b"Date: ") + 6, 1) is None  # too few slices


def test_memlock_growth_per_cached_byte(make_cache, maps):
    sizes = {"index.html": 1400, "style.css": 4800, "app.js": 15_800, "logo.svg": 700, "empty": 0}
    rng = random.Random(5)
    cache = make_cache({name: rng.randbytes(n) for name, n in sizes.items()})
    body = sum(sizes.values())
    grew = cache.memlock() - cache._memlock_empty
    assert grew == cache.policy.memlock()
    chunk = cache.abi.const("FS_CHUNK_SIZE")
    assert elements(maps) == sum(-(-len(stream_of(cache, maps, "/" + name)) // chunk) for name in sizes)
    assert len(maps["file_cache"]) == len(sizes) + 1  # index.html answers "/" too
    figures = cache.figures()
    assert figures["memlock_bytes"] == grew and figures["body_bytes"] == body
    assert figures["memlock_per_byte"] == round(grew / body, 3)
    assert figures["kernel_bytes_per_byte"] == round(cache.policy.used / body, 3)
    for name, n in sizes.items():
        assert body_of(cache, maps, "/" + name) == (cache.docroot / name).read_bytes()


def _slab_bytes(name: str) -> int | None:
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == name:
                return int(fields[1]) * int(fields[3])  # active objects * object size
    except OSError:
        pass
    return None


def test_real_kernel_memory_is_what_the_budget_counts(make_cache):
    """Entries come from kmalloc's 512-byte class, chunks from its 2 KiB class (memcg-accounted):
    the slabs grow by about policy.used. Other activity on the machine (other servers' maps)
    moves them too, hence the tolerance and up to three tries."""
    slabs = ("kmalloc-cg-512", "kmalloc-cg-2k")
    if any(_slab_bytes(name) is None for name in slabs):
        pytest.skip(f"no {' or '.join(slabs)} in /proc/slabinfo")
    files = {f"f{i:04d}.bin": bytes([i % 251]) * 1000 for i in range(1500)}
    ratios = []
    for _ in range(3):
        before = sum(map(_slab_bytes, slabs))
        cache = make_cache(files)
        grew = sum(map(_slab_bytes, slabs)) - before
        assert cache.policy.used == 1500 * (ENTRY_UNIT + CHUNK_UNIT)  # 1,248-byte tails: 2 KiB
        ratios.append(grew / cache.policy.used)
        if 0.85 < ratios[-1] < 1.2:
            return
        cache.close()
    pytest.fail(f"slab growth / counted cost: {ratios}")


# --- the policy at work ---------------------------------------------------------------------

def test_fill_takes_index_files_then_the_smallest_within_the_budget(make_cache, maps):
    files = {"index.html": b"i" * 3000, "a.txt": b"a" * 10, "b.bin": b"b" * 5000, "c.bin": b"c" * 9000,
             "sub/index.html": b"s" * 100}
    # streams hold about 250 bytes of head: index.html: 2 entries + a chunk and a 1,480-byte tail
    # (2 KiB); sub/index.html: 2 + a 440-byte tail; a.txt: 1 + one; b.bin would need 1 + 3 chunks
    used = 4 * ENTRY_UNIT + 2 * CHUNK_UNIT + TAIL_UNIT + FILE_UNIT
    cache = make_cache(files, budget=used + 1000)
    assert keys(maps) == {"/index.html", "/", "/sub/index.html", "/sub/", "/a.txt"}
    assert cache.policy.used == used and len(cache.policy) == 3
    assert not cache.add("b.bin")  # no room, and not requested: it stays with user space


def test_misses_admit_a_hot_file_and_evict_the_coldest(make_cache, maps):
    cache = make_cache({"a.txt": b"a" * 100, "b.txt": b"b" * 100, "c.txt": b"c" * 100}, budget=2 * FILE_UNIT)
    assert keys(maps) == {"/a.txt", "/b.txt"}
    for _ in range(3):
        cache.note_event(handoff_event(cache, "/c.txt"))
    cache.note_event(handoff_event(cache, "/a.txt", "FS_STAT_HANDOFF_STALE"))  # a: requested once
    cache.note_event(handoff_event(cache, "/b.txt", "FS_STAT_HANDOFF_RANGE"))  # not a miss
    cache.revalidate()  # the once-a-second sweep
    assert keys(maps) == {"/a.txt", "/c.txt"}
    assert body_of(cache, maps, "/c.txt") == b"c" * 100
    assert elements(maps) == 2  # b's chunk went with it
    assert (cache.policy.evicted, cache.policy.admitted) == (1, 3)


def test_a_cold_miss_does_not_displace_anything(make_cache, maps):
    cache = make_cache({"a.txt": b"a" * 100, "b.txt": b"b" * 100}, budget=FILE_UNIT)
    cache.note_event(handoff_event(cache, "/b.txt"))
    cache.revalidate()
    assert keys(maps) == {"/a.txt"} and cache.policy.evicted == 0


def test_tap_counts_misses_and_passes_records_on(make_cache):
    cache = make_cache({"a.txt": b"a"}, fill=False)
    seen = []
    tapped = cache.tap(seen.append)
    record = handoff_event(cache, "/x.txt")
    tapped(record)
    assert seen == [record] and cache.policy.heat("x.txt") == 1


def test_watch_events_reads_the_ring_buffer(make_cache):
    cache = make_cache({"a.txt": b"a"}, fill=False)
    assert cache.watch_events()
    assert not cache.watch_events()  # one reader


def test_unreadable_files_are_left_to_user_space(make_cache, maps):
    cache = make_cache({"a.txt": b"a" * 10}, fill=False)
    path = cache.docroot / "a.txt"
    os.chmod(path, 0o600)
    time.sleep(0.03)
    assert not cache.add("a.txt") and not keys(maps)
    os.chmod(path, 0o644)
    time.sleep(0.03)
    assert cache.add("a.txt") and keys(maps) == {"/a.txt"}


def test_a_file_modified_in_the_future_is_left_to_user_space(make_cache, maps):
    """Its Last-Modified is the Date of each answer (RFC 9110 §8.8.2.1), which a head built
    once cannot hold; cached once its mtime has passed."""
    cache = make_cache({"a.txt": b"a" * 10}, fill=False)
    path = cache.docroot / "a.txt"
    os.utime(path, (time.time(), time.time() + 3600))
    time.sleep(0.03)
    assert not cache.add("a.txt") and not keys(maps)
    os.utime(path, (time.time(), time.time() - 60))
    time.sleep(0.03)
    assert cache.add("a.txt") and keys(maps) == {"/a.txt"}


def test_a_file_changed_a_moment_ago_is_cached_once_it_settled(make_cache, maps):
    cache = make_cache({}, fill=False)
    (cache.docroot / "new.txt").write_bytes(b"new")
    assert not cache.add("new.txt")  # ctime is younger than SETTLE_NS
    assert wait_for(lambda: keys(maps) == {"/new.txt"}, 1.0)


def test_a_rewritten_file_is_dropped_then_refilled_without_leftover_chunks(make_cache, maps):
    cache = make_cache({"a.bin": b"1" * 5000})
    assert elements(maps) == 3 and len(maps["file_data"]) == 2
    with open(cache.docroot / "a.bin", "r+b") as f:  # the open waits until the entry is gone
        assert "/a.bin" not in keys(maps)
        f.truncate(0)
        f.write(b"2" * 1000)
    assert wait_for(lambda: cached_body(cache, maps, "/a.bin") == b"2" * 1000)
    assert elements(maps) == 1 and cache.policy.used == ENTRY_UNIT + CHUNK_UNIT  # a 1,248-byte tail


def test_publish_writes_the_figures_and_close_removes_them(make_cache, tmp_path):
    state = tmp_path / "state" / "cache.json"
    cache = make_cache({"a.txt": b"a" * 10}, budget=1 << 20, state_file=state, tracepoints=True)
    cache.publish()
    figures = json.loads(state.read_text())
    assert figures["budget"] == 1 << 20 and figures["files"] == 1 and figures["used"] == FILE_UNIT
    assert figures["coherence"].startswith("inode ctime tracepoints")
    cache.close()
    assert not state.exists()


def test_admissions_and_evictions_are_published_at_once(make_cache, tmp_path):
    """fsctl stats reads the maps live: the figures must not wait for the next sweep (they did,
    and a stats run right after an eviction showed the new file's hits with evicted 0)."""
    state = tmp_path / "state" / "cache.json"
    cache = make_cache({"a.txt": b"a" * 10, "b.txt": b"b" * 10}, budget=FILE_UNIT, state_file=state)
    figures = json.loads(state.read_text())  # the fill's, without a publish() of the caller's
    assert (figures["files"], figures["admitted"], figures["evicted"]) == (1, 1, 0)
    cache.policy.missed("b.txt", 3)  # hot enough to displace a.txt
    assert cache.add("b.txt")
    figures = json.loads(state.read_text())
    assert (figures["files"], figures["admitted"], figures["evicted"]) == (1, 2, 1)
    assert figures["body_bytes"] == 10 and cache.policy.files().keys() == {"b.txt"}


def test_coherence_names_the_mechanisms_in_use(make_cache):
    cache = make_cache({}, fill=False, tracepoints=False)
    assert "tracepoints" not in cache.coherence and "inotify" in cache.coherence
    from fileserver_ctl import cache as cache_module

    assert cache_module.COHERENCE_WITHOUT_FENTRY  # what doctor shows, found out on this machine


def test_keys_for_index_files():
    assert keys_for("a/index.html") == ["/a/index.html", "/a/"]


# --- replacing a version: the program never finds the path missing --------------------------

class Watched(MutableMapping):
    """A real map whose every write and delete is followed by `after(op, key)`: what the
    program would find at that moment can be checked between any two map updates."""

    def __init__(self, m: Any, after: Callable[[str, bytes], None]) -> None:
        self._m, self._after = m, after

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)

    def __getitem__(self, key: bytes) -> Any:
        return self._m[key]

    def __setitem__(self, key: bytes, value: Any) -> None:
        self._m[key] = value
        self._after("update", key)

    def __delitem__(self, key: bytes) -> None:
        del self._m[key]
        self._after("delete", key)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)


@pytest.fixture
def watched_cache(maps: dict, tmp_path: Path) -> Iterator:
    """watched_cache(files) -> (KernelCache over a docroot of files, list of map operations
    after which a cached path was not answerable: missing, or its stream incomplete)."""
    made: list[KernelCache] = []

    def make(files: dict[str, bytes]) -> tuple[KernelCache, list]:
        for name in (*STREAM_MAPS, "cached_inodes"):
            for key in list(maps[name]):
                del maps[name][key]
        docroot = tmp_path / "www"
        for name, data in files.items():
            (docroot / name).parent.mkdir(parents=True, exist_ok=True)
            (docroot / name).write_bytes(data)
        watching: set[str] = set()
        broken: list[tuple[str, bytes, str, str]] = []

        def check(op: str, key: bytes) -> None:
            for path in watching:
                raw = path.encode().ljust(PATH_MAX, b"\0")
                try:
                    e = cache.abi.unpack("struct fs_entry", maps["file_cache"][raw])
                except KeyError:
                    broken.append((op, key, path, "missing"))
                    continue
                n = e["head_len"] + e["body_len"]
                for i in range(-(-n // cache.abi.const("FS_CHUNK_SIZE"))):
                    if cache._data_key(e["data_id"], i) not in cache._map_of(n, i)[0]:
                        broken.append((op, key, path, f"chunk {i} missing"))

        watched = {**maps, **{name: Watched(maps[name], check) for name in STREAM_MAPS}}
        cache = KernelCache(watched, Settings(docroot=docroot, port=PORT))
        made.append(cache)
        assert cache.fill() == len(files)
        watching.update(k for name in files for k in keys_for(name))
        return cache, broken

    yield make
    for cache in made:
        cache.close()


def test_an_unchanged_file_added_again_later_is_left_as_it_is(watched_cache, maps):
    """Every user-space 200 for a cached file adds it again (on_served). A second later the
    Date in its heads differs, but the version does not: nothing in the maps moves."""
    cache, broken = watched_cache({"index.html": b"i" * 3000})
    before = {k: maps["file_cache"][k] for k in maps["file_cache"]}
    time.sleep(1.1)
    assert cache.add("index.html")
    assert {k: maps["file_cache"][k] for k in maps["file_cache"]} == before
    assert broken == []


def test_a_version_replaced_in_place_is_answerable_at_every_step(watched_cache, maps, monkeypatch):
    """A new version of a file whose inode did not change (here: a precompressed sibling makes
    its heads say Vary) replaces the old: its stream first, then each path's entry with one map
    update, then the old chunks. No path is missing in between."""
    from fileserver_ctl import cache as cache_module

    cache, broken = watched_cache({"index.html": random.Random(3).randbytes(5000)})
    old = entry_of(cache, maps, "/index.html")
    monkeypatch.setattr(cache_module, "_has_encoded_sibling", lambda path: True)
    assert cache.add("index.html")
    new = entry_of(cache, maps, "/")
    assert new["data_id"] != old["data_id"] and new["flags"] & cache._encoded_flag
    assert entry_of(cache, maps, "/index.html") == new
    assert broken == []
    assert b"Vary: Accept-Encoding" in stream_of(cache, maps, "/")
    chunk = cache.abi.const("FS_CHUNK_SIZE")
    assert elements(maps) == -(-len(stream_of(cache, maps, "/")) // chunk)  # old chunks gone


@pytest.mark.parametrize("seen", [True, False], ids=["new-version", "change-after-read"])
def test_a_changed_file_is_not_answered_from_its_old_version(watched_cache, maps, seen: bool):
    """When the file changed (the kernel dropped its inode), the old entry must not come back
    with the inode: it goes before the inode is put back, then the new version comes. Also when
    the version at hand was read before the change (same version id as the old entry: here the
    inode is dropped by hand and the file left alone; a chmod between the read and the install
    would be caught by the re-stat, but only after the inode is back)."""
    cache, broken = watched_cache({"a.txt": b"1" * 100})
    cache._watch._changed = lambda rel, tree: None  # here only add() acts on the change
    old = entry_of(cache, maps, "/a.txt")
    inode = cache.abi.pack("struct fs_inode_key", {"ino": old["ino"], "dev": old["dev"]})
    if seen:
        os.utime(cache.docroot / "a.txt", ns=(0, 10**9))  # a change that makes a new version...
    del maps["cached_inodes"][inode]  # ... and what the ctime tracepoint does then
    time.sleep(0.03)  # settled
    inserted = []
    real = cache._track_inode

    def track(rel: str, node: tuple[int, int], *, insert: bool = True) -> None:
        inserted.append(("/a.txt" in keys(maps), insert))
        real(rel, node, insert=insert)

    cache._track_inode = track
    assert cache.add("a.txt")
    assert inserted == [(False, True)]  # the old entry was gone when the inode went back
    new = entry_of(cache, maps, "/a.txt")
    assert (new["data_id"] != old["data_id"]) == seen and inode in maps["cached_inodes"]
    assert ("delete", b"/a.txt".ljust(PATH_MAX, b"\0"), "/a.txt", "missing") in broken


# --- fsctl up end to end --------------------------------------------------------------------

def get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        status, body, _ = _read_reply(s, bytearray())
        return status, body


# The figures (admitted, evicted) must be those of the maps the kernel answers from: the eviction
# made on hot.txt's miss is published at once, not at the next once-a-second sweep.
def test_fsctl_up_admits_a_hot_file_over_a_cold_one_and_stats_show_it(real_bpf_object):
    port = pick_port(PORTS[:-1])
    with tempfile.TemporaryDirectory(prefix="cache-") as tmp:
        docroot = Path(tmp)
        for name in ("index.html", "a.txt", "b.txt", "hot.txt"):
            (docroot / name).write_bytes(name.encode() * 10)
        # index.html (2 entries, 1 tail: 1,024 bytes) and one small file (1 and 1: 768) fit;
        # a.txt comes first by name; a third file would need another 768
        with fsctl_up(port, docroot, "--cache-size", "2k", "--workers", "1") as srv:
            assert re.search(r"Kernel cache: 2 files from .* \(\d[\d.,]* (B|KiB) of kernel memory, budget ",
                             "".join(srv.output))
            pins = Pins(port)
            try:
                def kernel_answers_hot() -> bool:
                    before = pins.responses()
                    assert get(port, "/hot.txt") == (200, b"hot.txt" * 10)
                    return pins.responses() == before + 1
                assert not kernel_answers_hot()
                assert wait_for(kernel_answers_hot, 5.0)  # misses made it hot: a.txt made room
                for _ in range(3):
                    assert kernel_answers_hot()
                doc = json.loads(subprocess.run(
                    [sys.executable, "-m", "fileserver_ctl", "stats", "--json", "-p", str(port)],
                    capture_output=True, text=True, cwd=REPO, timeout=30, check=True).stdout)
            finally:
                pins.close()
    c = doc["cache"]
    assert (c["budget"], c["used"], c["files"], c["entries"]) == (2 << 10, 3 * ENTRY_UNIT + 2 * TAIL_UNIT, 2, 3)
    assert c["evicted"] == 1 and c["admitted"] == 3 and c["max_file"] == Settings().cache_max_file
    hits = {f["path"]: f["hits"] for f in c["hits"]}
    assert hits["/hot.txt"] >= 4 and set(hits) == {"/hot.txt", "/index.html", "/"}
    assert c["memlock_bytes"] == 3 * c["element_bytes"]["file_cache"] + 2 * c["element_bytes"]["file_tail_440"]
    assert c["memlock_per_byte"] == round(c["memlock_bytes"] / (10 * 10 + 10 * 7), 3)
    assert doc["cached_files"] == 2 and doc["cached_bytes"] == 170


def _counter(port: int, name: str) -> int:
    abi = libbpf.Abi(config.ABI_HEADER)
    with libbpf.Map.from_pin(config.pin_dir(port) / "stats") as m:
        idx = abi.enum("fs_stat")[name].to_bytes(4, "little")
        return sum(int.from_bytes(v[:8], "little") for v in m[idx])


def test_a_long_answer_in_flight_survives_user_space_serving_the_same_file(real_bpf_object):
    """User space answering a 200 for a cached file adds it again (on_served). Before, a second
    or more after it was cached that made a new version and deleted the old chunks, and an
    answer of many segments still being sent from them stalled for good (seen in the lossy
    tests); now the unchanged version stays as it is."""
    port = pick_port(PORTS[:-1])
    data = random.Random(2).randbytes(200_000)
    with tempfile.TemporaryDirectory(prefix="cache-") as tmp:
        (Path(tmp) / "k200.bin").write_bytes(data)
        with fsctl_up(port, Path(tmp), "--workers", "1"):
            time.sleep(1.2)  # the Date in a head built now differs from the cached one
            errors, misses = _counter(port, "FS_STAT_ERRORS"), _counter(port, "FS_STAT_HANDOFF_MISS")
            with socket.socket() as slow:
                slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the answer waits
                slow.settimeout(10)
                slow.connect(("127.0.0.1", port))
                slow.sendall(b"GET /k200.bin HTTP/1.1\r\nHost: t\r\n\r\n")
                time.sleep(0.2)
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /k200.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                              b"If-Modified-Since: Sat, 01 Jan 2000 00:00:00 GMT\r\n\r\n")
                    assert _read_reply(s, bytearray())[:2] == (200, data)  # from user space
                time.sleep(0.5)  # its on_served has reached the cache
                assert get(port, "/k200.bin") == (200, data)
                buf = bytearray()
                while len(buf.partition(b"\r\n\r\n")[2]) < len(data):
                    chunk = slow.recv(65536)
                    assert chunk, "closed before the whole body"
                    buf += chunk
            assert bytes(buf.partition(b"\r\n\r\n")[2]) == data
            assert _counter(port, "FS_STAT_ERRORS") == errors
            assert _counter(port, "FS_STAT_HANDOFF_MISS") == misses


def test_a_path_longer_than_the_key_is_served_by_user_space(real_bpf_object):
    """A request path of FS_PATH_MAX bytes or more cannot be a file_cache key: the filler skips
    its file (and says so with -v), the program hands the request off as a target it does not
    take, and user space answers it; a short path beside it is still the kernel's."""
    port = pick_port(PORTS[:-1])
    long_dir = "d" * 60 + "/" + "e" * 60
    with tempfile.TemporaryDirectory(prefix="cache-") as tmp:
        docroot = Path(tmp)
        (docroot / long_dir).mkdir(parents=True)
        (docroot / long_dir / "long.txt").write_bytes(b"far away\n")
        (docroot / "near.txt").write_bytes(b"near\n")
        long_path = f"/{long_dir}/long.txt"
        assert len(long_path) >= PATH_MAX
        with fsctl_up(port, docroot, "--workers", "1", "-v") as srv:
            pins = Pins(port)
            try:
                target = _counter(port, "FS_STAT_HANDOFF_TARGET")
                assert get(port, long_path) == (200, b"far away\n")
                assert _counter(port, "FS_STAT_HANDOFF_TARGET") == target + 1
                before = pins.responses()
                assert get(port, "/near.txt") == (200, b"near\n")
                assert pins.responses() == before + 1
                assert get(port, long_path) == (200, b"far away\n")  # not admitted since
                assert _counter(port, "FS_STAT_HANDOFF_TARGET") == target + 2
            finally:
                pins.close()
            assert wait_for(lambda: "longer than the kernel's key" in "".join(srv.output), 3.0)


def test_top_shows_the_budget_in_80_columns():
    import io

    from rich.console import Console

    from fileserver_ctl import tui
    sys.path.insert(0, str(REPO / "tests"))
    from test_tui import snapshot

    console = Console(file=io.StringIO(), width=80, height=24, record=True, color_system=None)
    console.print(tui.render(snapshot(cache={"used": 3 * 2048, "budget": 64 << 20}), None))
    lines = console.export_text().splitlines()
    assert any("cached 12 files, 47.1 KiB in 6.0 KiB of 64.0 MiB" in line for line in lines), lines
    assert max(map(len, lines)) <= 80 and len(lines) <= tui.FRAME_LINES


def test_a_lease_being_taken_is_not_taken_for_one_being_broken(tmp_path, monkeypatch):
    """A lease break elsewhere makes check_leases() look at every lease. One registered but not
    yet set (no lease reads as F_UNLCK, as one being broken) was dropped from the cache for
    nothing, and requests for it missed until it was refilled."""
    from fileserver_ctl import cache as cache_module

    (tmp_path / "a.txt").write_bytes(b"a")
    changed: list[str] = []
    fw = cache_module.FileWatch(tmp_path, lambda rel, tree: changed.append(rel), lambda rel: None)
    if not fw.leases:
        fw.close()
        pytest.skip("leases disabled here (fs.leases-enable)")
    real_fcntl = cache_module.fcntl.fcntl
    checker: list = []

    def fcntl_with_a_break_meanwhile(fd, cmd, *args):
        if cmd == cache_module.fcntl.F_SETSIG and not checker:  # registered, lease not set yet
            import threading

            checker.append(threading.Thread(target=fw.check_leases))
            checker[0].start()
            checker[0].join(0.2)
        return real_fcntl(fd, cmd, *args)

    fd = os.open(tmp_path / "a.txt", os.O_RDONLY)
    try:
        monkeypatch.setattr(cache_module.fcntl, "fcntl", fcntl_with_a_break_meanwhile)
        assert fw.lease(fd, "a.txt")
        monkeypatch.undo()
        checker[0].join(5)
        assert changed == []  # its lease is held, not broken
    finally:
        fw.unlease(fd)
        fw.close()


def _indexes_agree(cache: KernelCache) -> None:
    """The reverse indexes (path -> lease fds, path -> inode) say what the forward ones say."""
    watch = cache._watch
    assert {fd: rel for rel, fds in watch._lease_fds.items() for fd in fds} == watch._leases
    assert {rel: inode for inode, rels in cache._inodes.items() for rel in rels} == cache._inode_of


def test_leases_and_inodes_are_indexed_both_ways(make_cache, maps):
    """A path's leases and inode are found without a scan of every cached file (start-up with
    thousands of files was quadratic); the two ways agree through fill, change, link, remove."""
    cache = make_cache({"a.txt": b"a" * 100, "b.txt": b"b" * 200, "d/c.txt": b"c" * 300})
    assert cache._watch.leases, "this test needs leases (root, a local file system)"
    _indexes_agree(cache)
    assert set(cache._inode_of) == {"a.txt", "b.txt", "d/c.txt"}
    os.link(cache.docroot / "a.txt", cache.docroot / "a2.txt")  # one inode, two paths
    time.sleep(0.05)
    assert wait_for(lambda: cache.add("a2.txt"))
    assert cache._inode_of["a2.txt"] == cache._inode_of["a.txt"]
    _indexes_agree(cache)
    (cache.docroot / "b.new").write_bytes(b"B" * 200)
    os.rename(cache.docroot / "b.new", cache.docroot / "b.txt")  # a new inode for b.txt
    assert wait_for(lambda: cached_body(cache, maps, "/b.txt") == b"B" * 200)
    assert cache._inode_of["b.txt"][1] == os.stat(cache.docroot / "b.txt").st_ino
    _indexes_agree(cache)
    assert cache.remove("d/c.txt")
    assert "d/c.txt" not in cache._inode_of and "d/c.txt" not in cache._watch._lease_fds
    _indexes_agree(cache)


def test_a_budget_beyond_what_the_maps_hold_is_capped_at_their_capacity(make_cache, maps):
    """--cache-size 900G: the maps' max_entries bound what can ever be cached; the policy must
    not count on more (fsctl up says so)."""
    cache = make_cache({"a.txt": b"a"}, budget=900 << 30)
    capacity = (maps["file_cache"].max_entries * cache.layout.entry_element
                + maps["file_data"].max_entries * cache.layout.chunk_element)
    assert capacity < cache.capacity < 900 << 30
    assert cache.policy.budget == cache.capacity
    assert make_cache({"a.txt": b"a"}, budget=1 << 20).policy.budget == 1 << 20


@pytest.mark.bpf
def test_idle_close_asks_the_attached_program(free_port: int, tmp_path: Path):
    """With the program attached here, idle keep-alive connections are marked closing by the
    program under its lock (keepalive.py), not by a read-modify-write from user space."""
    from fileserver_ctl.kernel import KernelPath

    settings = Settings(docroot=tmp_path, port=free_port)
    with KernelPath(settings) as kp:
        cache = KernelCache(kp.maps, settings)
        try:
            assert cache._idle is not None and cache._idle.ask == cache._kicks.close_if_idle
        finally:
            cache.close()
