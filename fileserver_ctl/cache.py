"""What the kernel fast path may answer: file_cache/file_data entries built from response.py.

An entry holds the exact head user space would send (response.file_head), the ETag's place in
it, and the checksum of each payload variant, so the TC program only copies bytes, writes the
current Date and patches the checksum for it. Bodies are stored in FS_CHUNK_SIZE pieces under a
fresh id per version: a new version is written completely before its entry points at it, then
the old chunks go.
"""

from __future__ import annotations

import array
import itertools
import os
import random
import stat
import string
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import response
from .config import ABI_HEADER, Settings

CLOSE_HEADER = b"Connection: close\r\n"
# Request-path characters the TC program takes as they are (bpf/http.bpf.h: PCHAR set); it
# hands off anything with "/." or "//", so such names are not worth caching.
_PLAIN_CHARS = frozenset(string.ascii_letters + string.digits + "-._~!$&'()*+,;=:@/")


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


@dataclass(frozen=True)
class CachedFile:
    """One file_cache entry as user space sees it."""

    path: str        # the request path it answers, "/a/b.html"
    size: int        # body bytes
    hits: int        # answers the kernel sent from it
    etag: str


class KernelCache:
    """Fills and invalidates the kernel's file cache; `maps` are the loaded object's maps."""

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
        self._resp = self.abi.enum("fs_resp")
        # per-version body ids; random start so a restart never reuses a live id
        self._ids = itertools.count(random.randrange(1, 1 << 30))
        self._bytes = 0
        self._sizes: dict[str, tuple[int, int]] = {}   # key -> (data_id, body bytes)
        self.refresh_date()

    # -- public API (contract 8) ---------------------------------------------------------

    def fill(self, docroot: str | os.PathLike[str] | None = None) -> int:
        """Cache every regular, non-hidden file under docroot that fits; returns how many."""
        root = Path(docroot).resolve() if docroot is not None else self.docroot
        count = 0
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                if self.add(rel):
                    count += 1
        return count

    def add(self, rel_path: str) -> bool:
        """Cache one file (path relative to the docroot); False when it is not cacheable."""
        key = "/" + rel_path.lstrip("/")
        built = self._build(key)
        if built is None:
            self.remove(rel_path)
            return False
        entry, body = built
        data_id = next(self._ids) & 0xFFFFFFFF
        old = self._sizes.get(key)
        budget = self.settings.cache_size - self._bytes + (old[1] if old else 0)
        if len(body) > budget:
            return False
        for index in range(0, max(1, -(-len(body) // self._chunk))):
            piece = body[index * self._chunk:(index + 1) * self._chunk]
            self._data[self._data_key(data_id, index)] = piece.ljust(self._chunk, b"\0")
        entry["data_id"] = data_id
        self._cache[self._path_key(key)] = self.abi.pack("struct fs_entry", entry)
        self._sizes[key] = (data_id, len(body))
        self._bytes += len(body) - (old[1] if old else 0)
        if old:
            self._drop_chunks(*old)
        return True

    def remove(self, rel_path: str) -> bool:
        """Stop answering a path in the kernel; True when it was cached."""
        key = "/" + rel_path.lstrip("/")
        try:
            del self._cache[self._path_key(key)]
        except KeyError:
            return False
        finally:
            old = self._sizes.pop(key, None)
            if old:
                self._bytes -= old[1]
                self._drop_chunks(*old)
        return True

    def refresh_date(self, now: float | None = None) -> None:
        """Write the current Date value; the program patches it into every answer."""
        value = response.http_date(time.time() if now is None else now).encode()
        self._date[(0).to_bytes(4, "little")] = value.ljust(self._slot, b"\0")

    def entries(self) -> list[CachedFile]:
        """What file_cache holds now, sorted by path."""
        found = []
        for raw_key in list(self._cache):
            try:
                value = self._cache[raw_key]
            except KeyError:
                continue
            e = self.abi.unpack("struct fs_entry", value)
            head = e["head"][:e["head_len"]]
            etag = head[e["etag_off"]:e["etag_off"] + e["etag_len"]].decode("latin-1")
            found.append(CachedFile(path=raw_key.rstrip(b"\0").decode("latin-1"),
                                    size=e["body_len"], hits=e["hits"], etag=etag))
        return sorted(found, key=lambda f: f.path)

    def __iter__(self) -> Iterator[CachedFile]:
        return iter(self.entries())

    # -- building entries ---------------------------------------------------------------

    def _path_key(self, key: str) -> bytes:
        return key.encode("latin-1").ljust(self._path_max, b"\0")

    def _data_key(self, data_id: int, index: int) -> bytes:
        return self.abi.pack("struct fs_data_key", {"data_id": data_id, "index": index})

    def _drop_chunks(self, data_id: int, size: int) -> None:
        for index in range(0, max(1, -(-size // self._chunk))):
            try:
                del self._data[self._data_key(data_id, index)]
            except KeyError:
                pass

    def _resolve(self, key: str) -> Path | None:
        """The file a request path names, if the kernel may answer it at all."""
        if (len(key) >= self._path_max or not key.startswith("/") or key.endswith("/")
                or not _PLAIN_CHARS.issuperset(key) or "//" in key or "/." in key):
            return None
        path = self.docroot / key.lstrip("/")
        try:
            real = path.resolve(strict=True)
            real.relative_to(self.docroot)
        except (OSError, ValueError, RuntimeError):
            return None
        return real

    def _build(self, key: str) -> tuple[dict[str, Any], bytes] | None:
        path = self._resolve(key)
        if path is None:
            return None
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or st.st_size > self.settings.cache_max_file:
                    return None
                body = f.read(st.st_size + 1)
        except OSError:
            return None
        if len(body) != st.st_size:
            return None  # changing under us: leave it to user space for now
        return self.entry_for(path, st, body)

    def entry_for(self, path: Path, st: os.stat_result, body: bytes,
                  date: str | None = None) -> tuple[dict[str, Any], bytes] | None:
        """The struct fs_entry fields answering `path` with `body`; None if it cannot fit."""
        date = date or response.http_date(time.time())
        vary = _has_encoded_sibling(path)
        head = response.file_head(200, st, path, date, vary=vary)
        head304 = response.file_head(304, st, path, date, vary=vary)
        head_close = response.file_head(200, st, path, date, vary=vary, close=True)
        head304_close = response.file_head(304, st, path, date, vary=vary, close=True)
        # the program inserts "Connection: close" itself, right before the final CRLF
        if (head_close != head[:-2] + CLOSE_HEADER + b"\r\n"
                or head304_close != head304[:-2] + CLOSE_HEADER + b"\r\n"):
            return None
        if len(head) > self._head_max or len(head304) > self._head_max:
            return None
        date_b = date.encode()
        date_off, date304_off = _value_offset(head, b"Date"), _value_offset(head304, b"Date")
        etag_off = _value_offset(head, b"ETag")
        etag_value = response.etag(st).encode()
        if (head[date_off:date_off + len(date_b)] != date_b
                or head304[date304_off:date304_off + len(date_b)] != date_b
                or head[etag_off:etag_off + len(etag_value)] != etag_value):
            return None
        variants = {
            "FS_RESP_GET": head + body,
            "FS_RESP_GET_CLOSE": head_close + body,
            "FS_RESP_HEAD": head,
            "FS_RESP_HEAD_CLOSE": head_close,
            "FS_RESP_304": head304,
            "FS_RESP_304_CLOSE": head304_close,
        }
        csum = [0] * self._resp["FS_RESP_MAX"]
        for name, payload in variants.items():
            csum[self._resp[name]] = payload_sum(payload)
        entry = {
            "body_len": len(body),
            "head_len": len(head),
            "head304_len": len(head304),
            "date_off": date_off,
            "date304_off": date304_off,
            "etag_off": etag_off,
            "etag_len": len(etag_value),
            "flags": self.abi.enum("fs_entry_flags")["FS_ENTRY_F_ENCODED"] if vary else 0,
            "csum": csum,
            "date": date_b,
            "head": head,
            "head304": head304,
        }
        return entry, body


def _value_offset(head: bytes, name: bytes) -> int:
    """Offset of a header's value in a head built by response.head_bytes."""
    at = head.find(b"\r\n" + name + b": ")
    return -1 if at < 0 else at + len(name) + 4


def _has_encoded_sibling(path: Path) -> bool:
    """A precompressed variant next to the file: user space may answer it instead."""
    return any(path.with_name(path.name + ext).is_file() for ext in (".gz", ".br"))
