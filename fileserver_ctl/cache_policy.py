"""Which files the kernel cache holds: pure decisions about memory, admission and eviction.

Nothing here touches a map or a file; cache.py asks and acts. The rules:

- Cost is real kernel memory. file_cache and file_data are hash maps without preallocation, so
  the kernel allocates each element when it is inserted: the map's memlock figure counts
  `element` bytes for it (the kernel's htab_elem + key + value + bpf_mem_alloc's 8-byte list
  node, measured by cache.py), and the allocator (bpf_mem_alloc, on kmalloc) hands out the next
  kmalloc size class. FS_CHUNK_SIZE makes a file_data element exactly 2,048 bytes, a class of
  its own; a file_cache element (128-byte path key, small fs_entry) takes 512. A file costs one
  file_cache element per request path it answers (an index.html answers two) plus one file_data
  element per FS_CHUNK_SIZE of its stream (its 200 head, about 250 bytes, then the body; the
  304 head is built from the 200 head), but for the last chunk when shorter: it takes an
  element of the smallest tail map that holds it (tail_class; the first three tail maps make
  elements of exactly 256, 512 and 1,024 bytes), each rounded to its size class. The budget (`--cache-size`) bounds that sum;
  cached_inodes is preallocated once and not part of it. Where the stream's length is not known
  yet (the start-up fill ranks files by size alone), Layout.heads stands for the head.
- Per file: at most `max_file` body bytes (settings.cache_max_file).
- Heat: every second (sweep) each file's requests since the last sweep are added to its heat,
  which first decays by DECAY, so heat is a request rate with a half-life of about 6.6 s.
  Requests are the kernel's answers (fs_entry.hits) for cached files and misses (requests the
  kernel handed to user space for that path, and user space's own reports) for the rest.
- Admission: a file that fits in the free budget is admitted at its first request. When the
  budget is full, a file with heat >= ADMIT_HEAT is admitted if the coldest cached files (least
  heat, then least recently requested) that must go to make room are all colder than it; they
  are evicted. Otherwise it stays with user space and keeps counting.
- At start (fill): index.html files first (each answers two paths, and a site's front pages are
  its most requested), then the smallest files first, so the most files fit; files that do not
  fit are skipped, not evicted for.
- Settling: a file whose ctime is younger than SETTLE_NS is not (re)admitted yet. Once it is
  older than a couple of clock ticks, any later write must move the ctime (timestamps are taken
  per tick on file systems without fine-grained ctime), which is what fires the kernel's
  invalidation (bpf/coherence.bpf.h); cache.py retries after the rest of the delay.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

DECAY = 0.9  # heat kept per one-second sweep: half-life log(0.5)/log(0.9) = 6.6 sweeps
ADMIT_HEAT = 2.0  # heat a file needs to displace others when the budget is full
FORGET_HEAT = 0.01  # candidates colder than this are forgotten
MAX_CANDIDATES = 4096  # uncached paths whose misses are counted, hottest kept
SETTLE_NS = 20_000_000  # a file changed more recently than this is not admitted yet
INDEX = "index.html"
KMALLOC_CLASSES = (8, 16, 32, 64, 96, 128, 192, 256, 512, 1024, 2048, 4096, 8192)
PAGE = 4096


def allocation(size: int) -> int:
    """Bytes kmalloc hands out for a `size`-byte object: its size class, or whole pages above
    the largest class."""
    for cls in KMALLOC_CLASSES:
        if size <= cls:
            return cls
    return -(-size // PAGE) * PAGE


def tail_class(length: int, chunk_size: int, caps: tuple[int, ...], head_room: int = 0) -> int:
    """Which tail map holds the last chunk of a stream of `length` bytes: 1 + the index of the
    smallest cap that holds it, or 0 when it is a file_data chunk (the stream ends on a chunk
    boundary, or its last chunk is longer than every cap). A stream shorter than a chunk needs
    `head_room` bytes at least (the program reads the head in one fixed-size copy). The
    program decides alike (bpf/stream.bpf.h: stream_tail_class)."""
    rest = length % chunk_size
    if not rest:
        return 0
    if length < chunk_size:
        rest = max(rest, head_room)
    return next((i + 1 for i, cap in enumerate(caps) if rest <= cap), 0)


@dataclass(frozen=True)
class Layout:
    """Kernel memory of one element of each map, as its memlock figure counts it."""

    entry_element: int  # one file_cache element (key, fs_entry, the kernel's overhead)
    chunk_element: int  # one file_data element (key, FS_CHUNK_SIZE bytes, overhead)
    chunk_size: int     # FS_CHUNK_SIZE
    heads: int = 0      # stream bytes besides the body (the head) when not known exactly
    tail_caps: tuple[int, ...] = ()      # FS_TAIL_CAP_<k>: bytes a tail map's element holds
    tail_elements: tuple[int, ...] = ()  # one element of each tail map
    head_room: int = 0  # FS_HEAD_ROOM

    def pieces(self, size: int, stream: int | None = None) -> tuple[int, int]:
        """(file_data elements, tail class or 0) of a file of `size` body bytes whose stream
        is `stream` bytes."""
        length = size + self.heads if stream is None else stream
        tail = tail_class(length, self.chunk_size, self.tail_caps, self.head_room)
        return -(-length // self.chunk_size) - (1 if tail else 0), tail

    def chunks(self, size: int, stream: int | None = None) -> int:
        """Elements (file_data and tail) of a file of `size` body bytes."""
        full, tail = self.pieces(size, stream)
        return full + (1 if tail else 0)

    def memlock(self, size: int, keys: int = 1, stream: int | None = None) -> int:
        """What the maps' memlock figures grow by for a file of `size` body bytes."""
        full, tail = self.pieces(size, stream)
        return (keys * self.entry_element + full * self.chunk_element
                + (self.tail_elements[tail - 1] if tail else 0))

    def cost(self, size: int, keys: int = 1, stream: int | None = None) -> int:
        """What the kernel really allocates for it (each element rounded to its size class)."""
        full, tail = self.pieces(size, stream)
        return (keys * allocation(self.entry_element) + full * allocation(self.chunk_element)
                + (allocation(self.tail_elements[tail - 1]) if tail else 0))


@dataclass(frozen=True)
class Decision:
    admit: bool
    evict: tuple[str, ...] = ()  # cached files to drop first, coldest first
    why: str = ""  # when refused: too large, over budget, colder than what it would displace


@dataclass
class _Slot:
    size: int
    keys: int
    cost: int
    stream: int | None = None  # its file_data stream's bytes (None: size + layout.heads)
    heat: float = 0.0
    seen: int = 0  # sweep of its last request (least recently requested goes first)
    hits: int = 0  # the entry's kernel hit counter at the last sweep


@dataclass
class CachePolicy:
    """Admission and eviction under a memory budget; keyed by docroot-relative path."""

    budget: int
    max_file: int
    layout: Layout
    admit_heat: float = ADMIT_HEAT
    used: int = 0  # cost of what is cached
    admitted: int = 0  # counts since start, for stats
    evicted: int = 0
    refused: int = 0
    sweeps: int = 0
    _cached: dict[str, _Slot] = field(default_factory=dict)
    _candidates: dict[str, float] = field(default_factory=dict)  # uncached path -> heat of misses

    # -- what is cached ---------------------------------------------------------------------

    def __contains__(self, rel: str) -> bool:
        return rel in self._cached

    def __len__(self) -> int:
        return len(self._cached)

    def cost(self, size: int, keys: int = 1, stream: int | None = None) -> int:
        return self.layout.cost(size, keys, stream)

    def body_bytes(self) -> int:
        return sum(s.size for s in self._cached.values())

    def memlock(self) -> int:
        """What the cached files add to the maps' memlock figures."""
        return sum(self.layout.memlock(s.size, s.keys, s.stream) for s in self._cached.values())

    def heat(self, rel: str) -> float:
        slot = self._cached.get(rel)
        return slot.heat if slot is not None else self._candidates.get(rel, 0.0)

    # -- decisions --------------------------------------------------------------------------

    def fill_order(self, files: Iterable[tuple[str, int]]) -> list[str]:
        """The start-up fill: (rel, size) pairs -> the files to cache, in order, that fit the
        free budget together (index.html first, then smallest first; see the module doc)."""
        def rank(item: tuple[str, int]) -> tuple[bool, int, int, str]:
            rel, size = item
            return (rel.rsplit("/", 1)[-1] != INDEX, size, rel.count("/"), rel)

        chosen, free = [], self.budget - self.used
        for rel, size in sorted(files, key=rank):
            if rel in self._cached or size > self.max_file:
                continue
            cost = self.cost(size, keys_of(rel))
            if cost <= free:
                chosen.append(rel)
                free -= cost
        return chosen

    def consider(self, rel: str, size: int, keys: int, stream: int | None = None) -> Decision:
        """May rel (size body bytes in a stream of `stream`, answering `keys` paths) be cached
        now, and what must go?"""
        if size > self.max_file:
            return Decision(False, why=f"larger than the per-file limit ({self.max_file} bytes)")
        cost = self.cost(size, keys, stream)
        old = self._cached.get(rel)
        need = cost - (old.cost if old else 0)
        if cost > self.budget:
            return Decision(False, why=f"larger than the whole budget ({self.budget} bytes)")
        if self.used + need <= self.budget:
            return Decision(True)
        heat = self.heat(rel)
        if heat < self.admit_heat:
            return Decision(False, why="budget full and not requested often enough")
        victims, freed = [], 0
        for other, slot in sorted(self._cached.items(), key=lambda kv: (kv[1].heat, kv[1].seen, kv[0])):
            if self.used + need - freed <= self.budget:
                break
            if other == rel:
                continue
            if slot.heat >= heat:
                return Decision(False, why="budget full of files requested as often")
            victims.append(other)
            freed += slot.cost
        if self.used + need - freed > self.budget:
            return Decision(False, why="budget full")
        return Decision(True, tuple(victims))

    # -- bookkeeping (cache.py calls these after acting) -------------------------------------

    def cached(self, rel: str, size: int, keys: int, stream: int | None = None) -> None:
        """rel is in the maps now (new, or rebuilt after a change)."""
        old = self._cached.pop(rel, None)
        if old is not None:
            self.used -= old.cost
        else:
            self.admitted += 1
        slot = _Slot(size=size, keys=keys, cost=self.cost(size, keys, stream), stream=stream,
                     heat=old.heat if old else self._candidates.pop(rel, 0.0),
                     seen=old.seen if old else self.sweeps)
        self._cached[rel] = slot
        self.used += slot.cost

    def dropped(self, rel: str, *, evicted: bool = False) -> None:
        """rel left the maps (changed, gone, or evicted); its heat stays as a candidate's."""
        slot = self._cached.pop(rel, None)
        if slot is None:
            return
        self.used -= slot.cost
        if evicted:
            self.evicted += 1
        if slot.heat >= FORGET_HEAT:
            self._candidates[rel] = slot.heat

    def declined(self, rel: str) -> None:
        """rel was refused or could not be built: stop proposing it until it is asked for again."""
        self.refused += 1
        self._candidates.pop(rel, None)

    def missed(self, rel: str, count: int = 1) -> None:
        """Requests for rel that the kernel did not answer (kept for MAX_CANDIDATES paths)."""
        slot = self._cached.get(rel)
        if slot is not None:
            slot.heat += count
            slot.seen = self.sweeps
        elif rel in self._candidates or len(self._candidates) < 2 * MAX_CANDIDATES:
            self._candidates[rel] = self._candidates.get(rel, 0.0) + count

    def sweep(self, hits: Mapping[str, int]) -> list[str]:
        """Once a second: fold in each cached file's kernel hit counter (fs_entry.hits, which
        starts again at 0 when an entry is rebuilt), decay every heat, and return the uncached
        files worth trying now, hottest first."""
        self.sweeps += 1
        for rel, slot in self._cached.items():
            now = hits.get(rel, slot.hits)
            new = now - slot.hits if now >= slot.hits else now
            slot.hits = now
            slot.heat = slot.heat * DECAY + new
            if new:
                slot.seen = self.sweeps
        # a candidate's heat is already (heat at the last sweep) * DECAY + misses since
        ranked = sorted(self._candidates.items(), key=lambda kv: (-kv[1], kv[0]))
        coldest = min((s.heat for s in self._cached.values()), default=0.0)
        room = self.used < self.budget
        worth = [rel for rel, heat in ranked
                 if heat >= 1.0 and (room or (heat >= self.admit_heat and heat > coldest))]
        self._candidates = {rel: heat * DECAY for rel, heat in ranked[:MAX_CANDIDATES]
                            if heat * DECAY >= FORGET_HEAT}
        return worth

    def files(self) -> dict[str, dict[str, float | int]]:
        """Cached files with their size, cost and heat (for stats)."""
        return {rel: {"size": s.size, "cost": s.cost, "heat": round(s.heat, 3)}
                for rel, s in sorted(self._cached.items())}


def keys_of(rel: str) -> int:
    """How many request paths a file answers: an index.html answers its directory's too."""
    return 2 if rel.rsplit("/", 1)[-1] == INDEX else 1


def settled(ctime_ns: int, now_ns: int, settle_ns: int = SETTLE_NS) -> int:
    """0 when a file whose ctime is ctime_ns (CLOCK_REALTIME) may be admitted at now_ns, else
    how many nanoseconds to wait."""
    return max(ctime_ns + settle_ns - now_ns, 0)
