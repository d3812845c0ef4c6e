#!/usr/bin/env python3
"""Kernel memory per cached body byte (issue 5: target <= 1.2x, from the maps' memlock figures).

Loads bpf/fileserver.bpf.o (nothing attached), and for each file set fills the kernel cache
with KernelCache.fill() over a temporary docroot, as `fsctl up` does at start, then prints:

- files, body bytes, file_cache entries, file_data elements (whole chunks) and tail elements
  (a stream's last chunk, when shorter, in the smallest file_tail_<cap> map that holds it;
  longer than any holds, it is a file_data element);
- memlock: how much the memlock figures of file_cache, file_data and the tail maps (the
  kernel's own count, /proc/self/fdinfo of the map fds) grew from empty, and that per body byte;
- real: what the allocator hands out for those elements (bpf_mem_alloc takes each element,
  with its 8-byte list node, from the next kmalloc size class), and that per body byte.

Sets: files of one size (1k, 4k, 16k, 64k, 256k: as many as make about --total bytes), the
bundled www/ site, and `mixed` (sizes spread evenly on a log scale from 100 bytes to 256 KiB,
seeded). The 200 head (status line and headers, about 250 bytes per file; the 304 head is not
stored) is not body bytes: it counts as overhead, as does the per-path file_cache entry.

    .venv/bin/python bench/bench_memory.py [--sets 1k,4k,16k,64k,256k,www,mixed] [--total 4M]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fileserver_ctl import config, libbpf  # noqa: E402
from fileserver_ctl.cache import KernelCache  # noqa: E402
from fileserver_ctl.cache_policy import allocation  # noqa: E402
from fileserver_ctl.config import Settings  # noqa: E402

PORT = 18798  # the object's server_port; nothing is attached
SIZES = {"1k": 1 << 10, "4k": 4 << 10, "16k": 16 << 10, "64k": 64 << 10, "256k": 256 << 10}
MIXED_FILES = 400
MIXED_RANGE = (100, 256 << 10)
SEED = 5


def memlock(fd: int) -> int:
    """A map's memlock figure, as the kernel reports it in fdinfo."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("memlock:"):
            return int(line.split()[1])
    raise RuntimeError(f"no memlock line in fdinfo of fd {fd}")


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def write_set(name: str, root: Path, total: int) -> None:
    """The files of set `name` under root."""
    rng = random.Random(SEED)
    if name in SIZES:
        size = SIZES[name]
        for i in range(max(total // size, 8)):
            (root / f"f{i:05d}.bin").write_bytes(rng.randbytes(size))
    elif name == "www":
        shutil.copytree(REPO / "www", root, dirs_exist_ok=True)
    elif name == "mixed":
        lo, hi = MIXED_RANGE
        for i in range(MIXED_FILES):
            size = round(lo * (hi / lo) ** rng.random())
            (root / f"m{i:04d}.bin").write_bytes(rng.randbytes(size))
    else:
        raise SystemExit(f"bench_memory: unknown set {name!r} (known: {', '.join([*SIZES, 'www', 'mixed'])})")


def stream_maps(maps: dict) -> list[str]:
    """The maps a cached file takes memory in: file_cache, file_data, the tail maps."""
    tails = sorted((n for n in maps if n.startswith("file_tail_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    return ["file_cache", "file_data", *tails]  # tails by size, as Layout.tail_caps


def empty(maps: dict) -> None:
    for name in (*stream_maps(maps), "cached_inodes"):
        for key in list(maps[name]):
            maps[name].pop(key, None)  # the cache's own clean-up may have been first


def measure(maps: dict, name: str, total: int) -> dict:
    empty(maps)
    base = sum(memlock(maps[n].fd) for n in stream_maps(maps))
    with tempfile.TemporaryDirectory(prefix=f"bench-memory-{name}-") as tmp:
        root = Path(tmp)
        write_set(name, root, total)
        settings = Settings(docroot=root, port=PORT, cache_size=1 << 30)
        cache = KernelCache(maps, settings, tracepoints=False)
        try:
            files = cache.fill()
            body = cache.cached_bytes()
            grew = sum(memlock(maps[n].fd) for n in stream_maps(maps)) - base
            entries, chunks = len(maps["file_cache"]), len(maps["file_data"])
            tails = [len(maps[n]) for n in stream_maps(maps)[2:]]
            layout = cache.layout
        finally:
            cache.close()
    empty(maps)
    real = (entries * allocation(layout.entry_element) + chunks * allocation(layout.chunk_element)
            + sum(n * allocation(e) for n, e in zip(tails, layout.tail_elements)))
    return {"set": name, "files": files, "body": body, "entries": entries, "chunks": chunks,
            "tails": sum(tails),
            "memlock": grew, "memlock_per_byte": grew / body if body else None,
            "real": real, "real_per_byte": real / body if body else None, "layout": layout}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="1k,4k,16k,64k,256k,www,mixed")
    ap.add_argument("--total", default="4M", help="body bytes per single-size set (default 4M)")
    args = ap.parse_args()
    if not config.BPF_OBJECT.exists():
        raise SystemExit(f"bench_memory: {config.BPF_OBJECT} not built (run: make -C bpf)")
    total = parse_size(args.total)

    obj = libbpf.BpfObject.open(config.BPF_OBJECT)
    try:
        obj.set_rodata("server_port", PORT.to_bytes(2, "little"))
        for prog in obj.programs():
            if prog.name.startswith("fileserver_ctime"):
                prog.set_autoload(False)  # not attached: nothing changes files here
        obj.load()
        maps = obj.maps()
        rows = [measure(maps, name.strip(), total) for name in args.sets.split(",") if name.strip()]
    finally:
        obj.close()

    layout = rows[0]["layout"]
    print(f"file_cache element: {layout.entry_element} B memlock, {allocation(layout.entry_element)} B "
          f"allocated; file_data element: {layout.chunk_element} B memlock, "
          f"{allocation(layout.chunk_element)} B allocated; chunk {layout.chunk_size} B")
    print("tail elements: " + ", ".join(
        f"{cap} B in {e} B memlock, {allocation(e)} allocated"
        for cap, e in zip(layout.tail_caps, layout.tail_elements)))
    head = f"{'set':<6} {'files':>6} {'body B':>10} {'entries':>7} {'chunks':>7} {'tails':>6} " \
           f"{'memlock B':>10} {'memlock/B':>9} {'real B':>10} {'real/B':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        per = lambda v: f"{v:.3f}" if v is not None else "-"
        print(f"{r['set']:<6} {r['files']:>6} {r['body']:>10} {r['entries']:>7} {r['chunks']:>7} {r['tails']:>6} "
              f"{r['memlock']:>10} {per(r['memlock_per_byte']):>9} {r['real']:>10} {per(r['real_per_byte']):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
