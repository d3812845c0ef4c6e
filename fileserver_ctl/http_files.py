"""Maps request paths to files under the docroot and keeps small files in memory.

A lookup result is one of FileEntry, Redirect, Listing, Forbidden, NotFound. Entries are cached
per request path and revalidated on every request with one stat() of the unresolved path: a file
that was written, replaced, deleted, chmod-ed, or a symlink that now leads elsewhere no longer
matches the cached (inode, size, mtime_ns, ctime_ns) and is resolved again, so memory never serves
stale bytes.

A file the server may not read is answered 403, as nginx does. Running as root, the server reads
what an unprivileged worker could: a file without read permission for others, or one behind a
directory of the docroot that others may not search (no x), is forbidden (the kernel cache holds
only such world-readable files for the same reason). A directory closed to others after a file
behind it was cached is seen within a second (the directories on the way are checked once per
clock tick, not per request). A symlink loop on the way is 403 too: nginx's open() fails with
ELOOP and says so.
"""

from __future__ import annotations

import errno
import html
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from . import response
from .http_semantics import PRECOMPRESSED, path_segments, target_query

SMALL_FILE = 256 << 10  # at most this many bytes are kept in memory per file...
MEMORY_BUDGET = 64 << 20  # ...and this many per worker; larger files go out with sendfile
MAX_ROUTES = 8192  # cached request paths per worker (cleared when full)


@dataclass(slots=True, eq=False)
class FileEntry:
    fs_path: str  # path under the docroot as requested (stat() follows its symlinks)
    rel_path: str  # relative to the docroot, "/"-separated: what on_served is told
    name: str  # resource name for Content-Type (the original's for a .gz/.br variant)
    st: os.stat_result
    etag: str
    last_modified: int  # whole seconds, as sent in Last-Modified
    body: bytes | None  # whole content when small, None when it is sent with sendfile
    coding: str | None = None  # Content-Encoding of a precompressed variant
    variants: dict[str, FileEntry] = field(default_factory=dict)
    checked_tick: int = -1  # clock tick when the .gz/.br siblings and the way in were last checked
    announced: bool = False  # on_served was told about this version of the file
    # Prebuilt complete 200 answers for the current Date: [keep-alive, close]
    date: str = ""
    full: list[bytes] = field(default_factory=lambda: [b"", b""])
    head_only: list[bytes] = field(default_factory=lambda: [b"", b""])

    def matches(self, st: os.stat_result) -> bool:
        cur = self.st
        return (st.st_mtime_ns == cur.st_mtime_ns and st.st_ino == cur.st_ino
                and st.st_size == cur.st_size and st.st_ctime_ns == cur.st_ctime_ns)

    @property
    def vary(self) -> bool:
        return bool(self.variants) or self.coding is not None

    def head(self, status: int, date: str, close: bool) -> bytes:
        return response.file_head(status, self.st, self.name, date, close=close,
                                  content_encoding=self.coding, vary=self.vary)

    def answer_200(self, date: str, close: bool, head_only: bool) -> bytes:
        """The complete 200 answer (head + body when in memory), rebuilt once per Date value."""
        if self.date is not date:
            self.date = date
            for i in (0, 1):
                h = self.head(200, date, bool(i))
                self.head_only[i] = h
                self.full[i] = h + self.body if self.body is not None else h
        return self.head_only[close] if head_only else self.full[close]


@dataclass(slots=True)
class Redirect:
    location: str


@dataclass(slots=True)
class Listing:
    fs_path: str
    url_path: str


class NotFound:
    pass


class Forbidden:
    pass


NOT_FOUND = NotFound()
FORBIDDEN = Forbidden()
Lookup = FileEntry | Redirect | Listing | Forbidden | NotFound
# as root every open() succeeds: ask for what an unprivileged reader needs instead
OTHERS_MUST_READ = os.geteuid() == 0


class FileStore:
    """The docroot of one worker: resolution, hidden/escape rules, in-memory small files."""

    def __init__(self, docroot: Path, *, autoindex: bool = False) -> None:
        self.root = Path(docroot).resolve(strict=True)
        self.root_str = str(self.root)
        self.autoindex = autoindex
        self.routes: dict[str, FileEntry] = {}
        self.memory_used = 0
        self.tick = 0  # advanced by the worker's clock once per second

    # -- the per-request path -----------------------------------------------------------

    def lookup(self, path: str, raw_target: str) -> Lookup:
        """What a request path names; `raw_target` (with query) is kept for redirects."""
        entry = self.routes.get(path)
        if entry is not None:
            try:
                st = os.stat(entry.fs_path)
            except OSError:
                st = None
            cur = entry.st
            if (st is not None and st.st_mtime_ns == cur.st_mtime_ns
                    and st.st_ino == cur.st_ino and st.st_size == cur.st_size
                    and st.st_ctime_ns == cur.st_ctime_ns):
                if entry.checked_tick == self.tick:
                    return entry
                # once a second: a directory on the way may have been closed to others (chmod
                # of a directory changes nothing the stat() above sees)
                if not OTHERS_MUST_READ or self._reachable(entry.fs_path):
                    self._refresh_variants(entry)
                    return entry
            self._forget(path, entry)
        return self._resolve(path, raw_target)

    def variant(self, entry: FileEntry, coding: str) -> FileEntry | None:
        """The up-to-date precompressed sibling of `entry` for `coding`, if it still exists."""
        var = entry.variants.get(coding)
        if var is None:
            return None
        try:
            st = os.stat(var.fs_path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode) or not _readable(st):
            del entry.variants[coding]
            return None
        if not var.matches(st):
            if var.body is not None:
                self.memory_used -= len(var.body)
            var = self._load(var.fs_path, var.rel_path, entry.name, st, coding)
            if var is None:
                del entry.variants[coding]
                return None
            entry.variants[coding] = var
        return var

    # -- resolution ---------------------------------------------------------------------

    def _resolve(self, path: str, raw_target: str) -> Lookup:
        parsed = path_segments(path)
        if parsed is None:
            return NOT_FOUND
        segments, trailing = parsed
        fs_path = os.path.join(self.root_str, *segments)
        if OTHERS_MUST_READ and not self._reachable(fs_path):
            return FORBIDDEN  # nginx's worker gets EACCES on the way, found or not
        st = self._stat_inside(fs_path)
        if st is None:
            return FORBIDDEN if _loops(fs_path) else NOT_FOUND
        rel = "/".join(segments)
        if stat.S_ISDIR(st.st_mode):
            if not trailing:
                if not _readable(st):
                    return FORBIDDEN  # nginx opens it (to tell a directory) before redirecting
                return Redirect(_folder_location(segments) + target_query(raw_target))
            index = os.path.join(fs_path, "index.html")
            if OTHERS_MUST_READ and not self._reachable(index):
                return FORBIDDEN
            ist = self._stat_inside(index)
            if ist is None:
                if _loops(index):
                    return FORBIDDEN
            elif stat.S_ISREG(ist.st_mode):
                if not _readable(ist):
                    return FORBIDDEN
                return self._admit(path, index, f"{rel}/index.html" if rel else "index.html",
                                   "index.html", ist)
            elif stat.S_ISDIR(ist.st_mode):
                # nginx's index module hands the request on to the folder named index.html,
                # whose URL then gets its slash
                return Redirect(_folder_location((*segments, "index.html"))
                                + target_query(raw_target))
            if self.autoindex:
                return Listing(fs_path, path)
            return NOT_FOUND
        if not stat.S_ISREG(st.st_mode) or trailing:
            return NOT_FOUND  # FIFOs, devices, sockets are never opened; "file/" is not a file
        if not _readable(st):
            return FORBIDDEN
        return self._admit(path, fs_path, rel, segments[-1], st)

    def _reachable(self, fs_path: str) -> bool:
        """Whether a reader without privileges could get through to fs_path's directory."""
        try:
            parent = Path(os.path.dirname(fs_path)).resolve()
        except (OSError, RuntimeError):
            return True  # a loop: not found, as before
        return others_may_search(self.root, parent)

    def _stat_inside(self, fs_path: str) -> os.stat_result | None:
        """stat() of a path whose real location is inside the docroot and not hidden."""
        try:
            real = Path(fs_path).resolve(strict=True)
            inside = real.relative_to(self.root)
            st = os.stat(real)
        except (OSError, ValueError, RuntimeError):
            return None  # missing, a loop, too long, or a symlink leading outside
        if any(part.startswith(".") for part in inside.parts):
            return None  # a symlink to a hidden name is as hidden as the name itself
        return st

    def _admit(self, path: str, fs_path: str, rel: str, name: str,
               st: os.stat_result) -> Lookup:
        try:
            entry = self._load(fs_path, rel, name, st, None)
        except PermissionError:
            return FORBIDDEN
        if entry is None:
            return NOT_FOUND
        self._refresh_variants(entry)
        if len(self.routes) >= MAX_ROUTES:
            self._clear()
        self.routes[path] = entry
        return entry

    def _load(self, fs_path: str, rel: str, name: str, st: os.stat_result,
              coding: str | None) -> FileEntry | None:
        body = None
        if st.st_size <= SMALL_FILE and self.memory_used + st.st_size <= MEMORY_BUDGET:
            try:
                fd = os.open(fs_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except PermissionError:
                if coding is None:
                    raise
                return None
            except OSError:
                return None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    return None
                chunks, left = [], st.st_size
                while left > 0:
                    chunk = os.read(fd, left)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    left -= len(chunk)
                after = os.fstat(fd)
            finally:
                os.close(fd)
            if left or after.st_mtime_ns != st.st_mtime_ns or after.st_size != st.st_size:
                body = None  # written while we read: send it from disk this time
            else:
                body = b"".join(chunks)
                self.memory_used += len(body)
        return FileEntry(fs_path=fs_path, rel_path=rel, name=name, st=st,
                         etag=response.etag(st), last_modified=response.mtime_seconds(st),
                         body=body, coding=coding)

    def _refresh_variants(self, entry: FileEntry) -> None:
        """Look for f.br / f.gz beside f (at most once per second per file)."""
        entry.checked_tick = self.tick
        found: dict[str, FileEntry] = {}
        for coding, suffix in PRECOMPRESSED:
            fs_path = entry.fs_path + suffix
            old = entry.variants.get(coding)
            st = self._stat_inside(fs_path)
            if st is None or not stat.S_ISREG(st.st_mode) or not _readable(st):
                continue
            if old is not None and old.matches(st):
                found[coding] = old
                continue
            var = self._load(fs_path, entry.rel_path + suffix, entry.name, st, coding)
            if var is not None:
                found[coding] = var
        for coding, old in entry.variants.items():
            if found.get(coding) is not old and old.body is not None:
                self.memory_used -= len(old.body)
        if found.keys() != entry.variants.keys():
            entry.date = ""  # Vary changed: rebuild the prebuilt heads
        entry.variants = found

    def _forget(self, path: str, entry: FileEntry) -> None:
        self.routes.pop(path, None)
        for e in (entry, *entry.variants.values()):
            if e.body is not None:
                self.memory_used -= len(e.body)

    def _clear(self) -> None:
        self.routes.clear()
        self.memory_used = 0

    # -- directory listing (--autoindex) -----------------------------------------------

    def listing_html(self, listing: Listing) -> bytes | None:
        try:
            with os.scandir(listing.fs_path) as it:
                items = sorted((e.name + ("/" if _is_dir(e) else ""))
                               for e in it if not e.name.startswith("."))
        except OSError:
            return None
        title = html.escape(f"Index of {listing.url_path}")
        rows = "".join(f'<a href="{quote(name, errors="surrogateescape")}">'
                       f"{html.escape(name)}</a>\r\n" for name in items)
        return (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
                f"<h1>{title}</h1><hr><pre><a href=\"../\">../</a>\r\n{rows}</pre><hr>"
                "</body>\r\n</html>\r\n").encode("utf-8", "surrogateescape")


def _folder_location(segments: tuple[str, ...]) -> str:
    """The path of a folder's URL with its slash, as nginx sends it: normalised (no dot
    segments, no empty ones: "//sub" would name the host "sub", RFC 3986 §4.2) and escaped
    where a path segment may not hold the character (RFC 3986 §3.3)."""
    return "".join("/" + quote(seg, safe="!$&'()*+,;=:@~", errors="surrogateescape")
                   for seg in segments) + "/"


def _loops(fs_path: str) -> bool:
    """Whether fs_path cannot be reached for a symlink loop (ELOOP): nginx's open() fails so and
    answers 403, where a missing file is 404."""
    try:
        os.stat(fs_path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def _is_dir(entry: os.DirEntry) -> bool:
    """A listed entry is a directory; a symlink loop is listed as a name (and is 404), as nginx
    lists it, rather than failing the whole listing."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def others_may_search(root: Path, directory: Path) -> bool:
    """Whether anyone may pass through `directory` (resolved): every directory below `root` down
    to it has search permission for others. The docroot itself is not asked: it was chosen."""
    try:
        inside = directory.relative_to(root)
    except ValueError:
        return True  # outside: refused for that reason by whoever asks
    for part in inside.parts:
        root = root / part
        try:
            mode = os.stat(root).st_mode
        except OSError:
            return True  # missing: not found, not forbidden
        if not stat.S_ISDIR(mode):
            return True  # a file taken for a directory: ENOTDIR, not found (nginx: 404)
        if not mode & stat.S_IXOTH:
            return False
    return True


def _readable(st: os.stat_result) -> bool:
    """Whether the server may send this file (see the module's docstring)."""
    return not OTHERS_MUST_READ or bool(st.st_mode & stat.S_IROTH)
