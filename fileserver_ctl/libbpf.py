"""cffi (ABI mode) binding to the system libbpf.so.1, limited to what the file server uses.

Written against libbpf 1.1 (Debian 12): every declaration below matches /usr/include/bpf of
that version, and nothing newer is called. The library is loaded on first use, not at import.
This is the only module of the project that touches cffi; everything else sees Python objects
and `OSError(errno, "call(object): reason")` for every failure.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import threading
from collections.abc import Callable, Iterator, MutableMapping
from enum import IntEnum, IntFlag
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("fileserver.libbpf")

_FIXED_WIDTH_TYPES = """
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef signed char __s8;
typedef short __s16;
typedef int __s32;
typedef long long __s64;
"""

# Declarations copied from libbpf 1.1's public headers. `size_t :0` tails are left out: they only
# pad the struct to size_t alignment, which cffi's layout gives anyway.
_LIBBPF_CDEF = _FIXED_WIDTH_TYPES + """
struct bpf_object;
struct bpf_program;
struct bpf_map;
struct bpf_link;
struct btf;
struct ring_buffer;
struct bpf_object_open_opts;
struct ring_buffer_opts;

struct btf_type {
    __u32 name_off;
    __u32 info;
    union { __u32 size; __u32 type; };
};
struct btf_var_secinfo { __u32 type; __u32 offset; __u32 size; };

struct bpf_tc_hook {
    size_t sz;
    int ifindex;
    int attach_point;
    __u32 parent;
};
struct bpf_tc_opts {
    size_t sz;
    int prog_fd;
    __u32 flags;
    __u32 prog_id;
    __u32 handle;
    __u32 priority;
};
struct bpf_xdp_attach_opts { size_t sz; int old_prog_fd; };
struct bpf_xdp_query_opts {
    size_t sz;
    __u32 prog_id;
    __u32 drv_prog_id;
    __u32 hw_prog_id;
    __u32 skb_prog_id;
    __u8 attach_mode;
};
struct bpf_link_create_opts {
    size_t sz;
    __u32 flags;
    void *iter_info;
    __u32 iter_info_len;
    __u32 target_btf_id;
    union {
        struct { __u64 bpf_cookie; } perf_event;
        struct { __u32 flags; __u32 cnt; const char **syms; const unsigned long *addrs;
                 const __u64 *cookies; } kprobe_multi;
        struct { __u64 cookie; } tracing;
    };
};
struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    __u32 data_size_in;
    __u32 data_size_out;
    const void *ctx_in;
    void *ctx_out;
    __u32 ctx_size_in;
    __u32 ctx_size_out;
    __u32 retval;
    int repeat;
    __u32 duration;
    __u32 flags;
    __u32 cpu;
    __u32 batch_size;
};

/* linux/bpf.h: the map info in full, the program info up to the fields read here
 * (the kernel accepts a shorter info_len). */
struct bpf_map_info {
    __u32 type;
    __u32 id;
    __u32 key_size;
    __u32 value_size;
    __u32 max_entries;
    __u32 map_flags;
    char name[16];
    __u32 ifindex;
    __u32 btf_vmlinux_value_type_id;
    __u64 netns_dev;
    __u64 netns_ino;
    __u32 btf_id;
    __u32 btf_key_type_id;
    __u32 btf_value_type_id;
    __u32 pad;
    __u64 map_extra;
};
struct bpf_prog_info_head {
    __u32 type;
    __u32 id;
    __u8 tag[8];
    __u32 jited_prog_len;
    __u32 xlated_prog_len;
    __u64 jited_prog_insns;
    __u64 xlated_prog_insns;
    __u64 load_time;
    __u32 created_by_uid;
    __u32 nr_map_ids;
    __u64 map_ids;
    char name[16];
    __u32 ifindex;
    __u32 flags;
};

struct bpf_prog_load_opts {
    size_t sz;
    int attempts;
    int expected_attach_type;
    __u32 prog_btf_fd;
    __u32 prog_flags;
    __u32 prog_ifindex;
    __u32 kern_version;
    __u32 attach_btf_id;
    __u32 attach_prog_fd;
    __u32 attach_btf_obj_fd;
    const int *fd_array;
    const void *func_info;
    __u32 func_info_cnt;
    __u32 func_info_rec_size;
    const void *line_info;
    __u32 line_info_cnt;
    __u32 line_info_rec_size;
    __u32 log_level;
    __u32 log_size;
    char *log_buf;
};
int bpf_prog_load(int prog_type, const char *prog_name, const char *license,
                  const void *insns, size_t insn_cnt, const struct bpf_prog_load_opts *opts);
struct btf *btf__load_vmlinux_btf(void);
void btf__free(struct btf *btf);

/* va_list arrives as a pointer on the ABIs Debian supports; only vsnprintf reads it. */
typedef int (*libbpf_print_fn_t)(int level, const char *fmt, void *ap);
libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn);
int vsnprintf(char *buf, size_t size, const char *fmt, void *ap);

const char *libbpf_version_string(void);
int libbpf_strerror(int err, char *buf, size_t size);
int libbpf_num_possible_cpus(void);

struct bpf_object *bpf_object__open_file(const char *path, const struct bpf_object_open_opts *opts);
int bpf_object__load(struct bpf_object *obj);
void bpf_object__close(struct bpf_object *obj);
struct btf *bpf_object__btf(const struct bpf_object *obj);
struct bpf_program *bpf_object__find_program_by_name(const struct bpf_object *obj, const char *name);
struct bpf_program *bpf_object__next_program(const struct bpf_object *obj, struct bpf_program *prog);
struct bpf_map *bpf_object__find_map_by_name(const struct bpf_object *obj, const char *name);
struct bpf_map *bpf_object__next_map(const struct bpf_object *obj, const struct bpf_map *map);

const char *bpf_program__name(const struct bpf_program *prog);
int bpf_program__fd(const struct bpf_program *prog);
struct bpf_link *bpf_program__attach_xdp(const struct bpf_program *prog, int ifindex);
struct bpf_link *bpf_program__attach(const struct bpf_program *prog);
int bpf_program__set_autoload(struct bpf_program *prog, bool autoload);

const char *bpf_map__name(const struct bpf_map *map);
int bpf_map__fd(const struct bpf_map *map);
int bpf_map__type(const struct bpf_map *map);
__u32 bpf_map__max_entries(const struct bpf_map *map);
__u32 bpf_map__key_size(const struct bpf_map *map);
__u32 bpf_map__value_size(const struct bpf_map *map);
int bpf_map__set_initial_value(struct bpf_map *map, const void *data, size_t size);
const void *bpf_map__initial_value(struct bpf_map *map, size_t *psize);

__s32 btf__find_by_name_kind(const struct btf *btf, const char *type_name, __u32 kind);
const struct btf_type *btf__type_by_id(const struct btf *btf, __u32 id);
const char *btf__name_by_offset(const struct btf *btf, __u32 offset);

int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int bpf_link_create(int prog_fd, int target_fd, int attach_type,
                    const struct bpf_link_create_opts *opts);

int bpf_link__fd(const struct bpf_link *link);
int bpf_link__pin(struct bpf_link *link, const char *path);
int bpf_link__destroy(struct bpf_link *link);

typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx,
                                     const struct ring_buffer_opts *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__poll(struct ring_buffer *rb, int timeout_ms);
int ring_buffer__consume(struct ring_buffer *rb);
int ring_buffer__epoll_fd(const struct ring_buffer *rb);

int bpf_tc_hook_create(struct bpf_tc_hook *hook);
int bpf_tc_hook_destroy(struct bpf_tc_hook *hook);
int bpf_tc_attach(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);
int bpf_tc_detach(const struct bpf_tc_hook *hook, const struct bpf_tc_opts *opts);
int bpf_tc_query(const struct bpf_tc_hook *hook, struct bpf_tc_opts *opts);

int bpf_xdp_attach(int ifindex, int prog_fd, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_detach(int ifindex, __u32 flags, const struct bpf_xdp_attach_opts *opts);
int bpf_xdp_query(int ifindex, int flags, struct bpf_xdp_query_opts *opts);
"""

BTF_KIND_FUNC = 12
BTF_KIND_DATASEC = 15
BPF_PROG_TYPE_TRACING = 26
BPF_TRACE_FENTRY = 24
# "r0 = 0; exit": the smallest program, for probing what the kernel lets load
_RETURN_ZERO_INSNS = bytes([0xB7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])
BPF_XDP_ATTACH_TYPE = 37  # enum bpf_attach_type BPF_XDP
_LIBBPF_LEVELS = (logging.WARNING, logging.INFO, logging.DEBUG)  # LIBBPF_WARN, _INFO, _DEBUG
_MESSAGES_KEPT = 40  # libbpf messages quoted in an error
_ERROR_TEXT_KEPT = 8000  # characters of them kept: the tail of a verifier log says what failed


class MapType(IntEnum):
    """enum bpf_map_type values this project meets."""

    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    RINGBUF = 27


PERCPU_MAP_TYPES = frozenset({MapType.PERCPU_HASH, MapType.PERCPU_ARRAY, MapType.LRU_PERCPU_HASH})


class UpdateFlags(IntFlag):
    ANY = 0
    NOEXIST = 1
    EXIST = 2


class TcAttachPoint(IntFlag):
    INGRESS = 1
    EGRESS = 2


class XdpFlags(IntFlag):
    NONE = 0
    UPDATE_IF_NOEXIST = 1
    SKB_MODE = 2  # generic XDP, works on every device
    DRV_MODE = 4  # native XDP, needs driver support
    HW_MODE = 8
    REPLACE = 16


class XdpAttachMode(IntEnum):
    NONE = 0
    DRV = 1
    SKB = 2
    HW = 3
    MULTI = 4


BPF_TC_F_REPLACE = 1
LIBBPF_ERRNO_START = 4000  # libbpf's own error codes (enum libbpf_errno) start here


# ---------------------------------------------------------------------------------------------
# Loading the library and turning failures into OSError


class _Libbpf:
    """The cffi handles, created once on first use."""

    def __init__(self) -> None:
        import cffi

        self.ffi = cffi.FFI()
        self.ffi.cdef(_LIBBPF_CDEF)
        try:
            self.lib = self.ffi.dlopen("libbpf.so.1")
        except OSError as exc:
            raise OSError(errno_mod.ENOENT, f"dlopen(libbpf.so.1): {exc} (install libbpf1)") from None
        self.libc = self.ffi.dlopen(None)
        self.print_fn = self.ffi.callback("libbpf_print_fn_t", self._on_print, error=0,
                                          onerror=self._on_print_error)
        self.lib.libbpf_set_print(self.print_fn)

    @staticmethod
    def _on_print_error(exc_type: type, exc: BaseException, tb: Any) -> None:
        """An exception in _on_print cannot cross libbpf's C frames. Ctrl-C or the CLI's SIGTERM
        (raised there when it lands during a load) is kept for _check() to raise once libbpf
        returns; otherwise the start would go on as if nothing was asked. A failed message is
        dropped: a lost line beats a failed load."""
        if not isinstance(exc, Exception):
            _thread_state.interrupted = exc

    def _on_print(self, level: int, fmt: Any, ap: Any) -> int:
        py_level = _LIBBPF_LEVELS[level] if 0 <= level < len(_LIBBPF_LEVELS) else logging.DEBUG
        if py_level < logging.WARNING and not log.isEnabledFor(py_level):
            return 0
        buf = self.ffi.new("char[]", 4096)
        self.libc.vsnprintf(buf, len(buf), fmt, ap)
        text = self.ffi.string(buf).decode(errors="replace").rstrip("\n")
        if py_level == logging.WARNING:
            _recent_messages().append(text)
            if getattr(_thread_state, "quiet", False):
                py_level = logging.DEBUG  # an answer the caller expects (kept for _error)
        log.log(py_level, "%s", text)
        return 0


_loaded: _Libbpf | None = None
_load_lock = threading.Lock()
_thread_state = threading.local()


def _bpf() -> _Libbpf:
    global _loaded
    if _loaded is None:
        with _load_lock:
            if _loaded is None:
                _loaded = _Libbpf()
    return _loaded


def _recent_messages() -> list[str]:
    if not hasattr(_thread_state, "messages"):
        _thread_state.messages = []
    return _thread_state.messages


def _start_call() -> None:
    _recent_messages().clear()


def _error(err: int, call: str, what: object) -> OSError:
    """OSError naming the call and its object, with what libbpf printed during the call."""
    err = abs(err) or errno_mod.EINVAL
    message = f"{call}({what}): {_strerror(err)}"
    printed = [line.strip() for line in _recent_messages() if line.strip()]
    if printed:
        text = "\n".join(printed[-_MESSAGES_KEPT:])
        if len(text) > _ERROR_TEXT_KEPT:
            text = "...\n" + text[-_ERROR_TEXT_KEPT:]
        message += "\n" + text
    return OSError(err, message)


def _raise_interrupted() -> None:
    """What a signal raised inside the print callback, now that libbpf has returned."""
    exc = getattr(_thread_state, "interrupted", None)
    if exc is not None:
        _thread_state.interrupted = None
        raise exc


def _strerror(err: int) -> str:
    """errno text; libbpf's own codes (4000 and up, e.g. 4001 for a file that is not an ELF
    object) by libbpf's words, where strerror says "Unknown error 4001"."""
    if err >= LIBBPF_ERRNO_START:
        ffi = _bpf().ffi
        buf = ffi.new("char[]", 256)
        if _bpf().lib.libbpf_strerror(err, buf, len(buf)) == 0:
            return ffi.string(buf).decode(errors="replace")
    return os.strerror(err)


def _check(ret: int, call: str, what: object) -> int:
    _raise_interrupted()
    if ret < 0:
        raise _error(-ret, call, what)
    return ret


def _check_ptr(ptr: Any, call: str, what: object) -> Any:
    _raise_interrupted()
    if ptr == _bpf().ffi.NULL:
        raise _error(_bpf().ffi.errno, call, what)
    return ptr


def _string(ptr: Any) -> str:
    ffi = _bpf().ffi
    return "" if ptr == ffi.NULL else ffi.string(ptr).decode()


def libbpf_version() -> str:
    """The loaded library's version, e.g. 'v1.1'."""
    return _string(_bpf().lib.libbpf_version_string())


def num_possible_cpus() -> int:
    _start_call()
    return _check(_bpf().lib.libbpf_num_possible_cpus(), "libbpf_num_possible_cpus", "")


def probe_fentry(target: str = "tcp_v4_rcv") -> None:
    """Load (and drop) an empty fentry program on a kernel function; OSError when refused, e.g.
    EPERM on a kernel locked down for integrity, where BPF trampolines are not allowed."""
    ffi, lib = _bpf().ffi, _bpf().lib
    _start_call()
    btf = _check_ptr(lib.btf__load_vmlinux_btf(), "btf__load_vmlinux_btf", "vmlinux")
    try:
        func_id = lib.btf__find_by_name_kind(btf, target.encode(), BTF_KIND_FUNC)
        _check(func_id, "btf__find_by_name_kind", target)
    finally:
        lib.btf__free(btf)
    opts = ffi.new("struct bpf_prog_load_opts *")
    opts.sz = ffi.sizeof("struct bpf_prog_load_opts")
    opts.expected_attach_type = BPF_TRACE_FENTRY
    opts.attach_btf_id = func_id
    insns = ffi.from_buffer(_RETURN_ZERO_INSNS)
    _start_call()
    fd = _check(lib.bpf_prog_load(BPF_PROG_TYPE_TRACING, b"fs_probe", b"GPL", insns,
                                  len(_RETURN_ZERO_INSNS) // 8, opts), "bpf_prog_load", f"fentry/{target}")
    os.close(fd)


# ---------------------------------------------------------------------------------------------
# Objects, programs, maps


class Program:
    """A program of a BpfObject; valid while the object is open."""

    def __init__(self, owner: BpfObject, handle: Any) -> None:
        self._owner = owner
        self._handle = handle
        self.name = _string(_bpf().lib.bpf_program__name(handle))

    @property
    def fd(self) -> int:
        fd = _bpf().lib.bpf_program__fd(self._handle)
        if fd < 0:
            raise OSError(errno_mod.EBADF, f"bpf_program__fd({self.name}): program not loaded")
        return fd

    def pin(self, path: str | os.PathLike[str]) -> None:
        obj_pin(self.fd, path, self.name)

    def attach_xdp(self, ifindex: int) -> Link:
        """XDP through a BPF link: native mode where the driver has it, else generic. The link
        detaches when its last file descriptor closes, so a crashed process leaves nothing."""
        _start_call()
        link = _check_ptr(_bpf().lib.bpf_program__attach_xdp(self._handle, ifindex),
                          "bpf_program__attach_xdp", f"{self.name}, ifindex {ifindex}")
        return Link(handle=link)

    def attach(self) -> Link:
        """Attach by the program's section (tp_btf/..., tracepoint/...): the link detaches when
        its last file descriptor closes."""
        _start_call()
        link = _check_ptr(_bpf().lib.bpf_program__attach(self._handle), "bpf_program__attach", self.name)
        return Link(handle=link, name=self.name)

    def set_autoload(self, autoload: bool) -> None:
        """Before load: leave this program out (e.g. its attach point is missing on this kernel)."""
        _start_call()
        _check(_bpf().lib.bpf_program__set_autoload(self._handle, autoload), "bpf_program__set_autoload",
               self.name)

    def __repr__(self) -> str:
        return f"Program({self.name!r})"


class BpfObject:
    """An ELF BPF object: open, optionally set .rodata, load, then use programs and maps."""

    def __init__(self, handle: Any, path: str) -> None:
        self._handle = handle
        self.path = path
        self._loaded = False

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> BpfObject:
        path = os.fspath(path)
        lib = _bpf().lib
        _start_call()
        handle = _check_ptr(lib.bpf_object__open_file(path.encode(), _bpf().ffi.NULL),
                            "bpf_object__open_file", path)
        return cls(handle, path)

    def _live(self) -> Any:
        if self._handle is None:
            raise OSError(errno_mod.EBADF, f"bpf_object({self.path}): already closed")
        return self._handle

    def rodata_vars(self) -> dict[str, tuple[int, int]]:
        """`const volatile` globals: name -> (offset in .rodata, size)."""
        ffi, lib = _bpf().ffi, _bpf().lib
        btf = lib.bpf_object__btf(self._live())
        if btf == ffi.NULL:
            return {}
        sec_id = lib.btf__find_by_name_kind(btf, b".rodata", BTF_KIND_DATASEC)
        if sec_id < 0:
            return {}
        sec = lib.btf__type_by_id(btf, sec_id)
        count = sec.info & 0xFFFF
        secinfos = ffi.cast("const struct btf_var_secinfo *", sec + 1)
        found = {}
        for i in range(count):
            var = lib.btf__type_by_id(btf, secinfos[i].type)
            found[_string(lib.btf__name_by_offset(btf, var.name_off))] = (
                secinfos[i].offset, secinfos[i].size)
        return found

    def _rodata_map(self) -> Any:
        ffi, lib = _bpf().ffi, _bpf().lib
        handle = lib.bpf_object__next_map(self._live(), ffi.NULL)
        while handle != ffi.NULL:
            if _string(lib.bpf_map__name(handle)).endswith(".rodata"):
                return handle
            handle = lib.bpf_object__next_map(self._handle, handle)
        raise OSError(errno_mod.ENOENT, f"bpf_object__find_map_by_name(.rodata): {self.path} has none")

    def set_rodata(self, var: str, value: bytes) -> None:
        """Set a `const volatile` global before load(); value must be exactly its size."""
        if self._loaded:
            raise OSError(errno_mod.EBUSY, f"bpf_map__set_initial_value({var}): object already loaded")
        layout = self.rodata_vars()
        if var not in layout:
            raise OSError(errno_mod.ENOENT, f"set_rodata({var}): no such const volatile in {self.path}")
        offset, size = layout[var]
        if len(value) != size:
            raise ValueError(f"set_rodata({var}): needs {size} bytes, got {len(value)}")
        ffi, lib = _bpf().ffi, _bpf().lib
        rodata = self._rodata_map()
        psize = ffi.new("size_t *")
        current = lib.bpf_map__initial_value(rodata, psize)
        if current == ffi.NULL:
            raise OSError(errno_mod.ENOENT, f"bpf_map__initial_value({var}): no .rodata image")
        image = bytearray(ffi.buffer(current, psize[0]))
        image[offset:offset + size] = value
        _start_call()
        _check(lib.bpf_map__set_initial_value(rodata, ffi.from_buffer(image), len(image)),
               "bpf_map__set_initial_value", var)

    def load(self) -> None:
        _start_call()
        _check(_bpf().lib.bpf_object__load(self._live()), "bpf_object__load", self.path)
        self._loaded = True

    def program(self, name: str) -> Program:
        handle = _bpf().lib.bpf_object__find_program_by_name(self._live(), name.encode())
        if handle == _bpf().ffi.NULL:
            raise OSError(errno_mod.ENOENT, f"bpf_object__find_program_by_name({name}): not in {self.path}")
        return Program(self, handle)

    def programs(self) -> list[Program]:
        ffi, lib = _bpf().ffi, _bpf().lib
        found, handle = [], lib.bpf_object__next_program(self._live(), ffi.NULL)
        while handle != ffi.NULL:
            found.append(Program(self, handle))
            handle = lib.bpf_object__next_program(self._handle, handle)
        return found

    def map(self, name: str) -> Map:
        handle = _bpf().lib.bpf_object__find_map_by_name(self._live(), name.encode())
        if handle == _bpf().ffi.NULL:
            raise OSError(errno_mod.ENOENT, f"bpf_object__find_map_by_name({name}): not in {self.path}")
        return Map._from_object(self, handle)

    def maps(self) -> dict[str, Map]:
        """Every map of the object by name, including the internal .rodata/.bss ones."""
        ffi, lib = _bpf().ffi, _bpf().lib
        found, handle = {}, lib.bpf_object__next_map(self._live(), ffi.NULL)
        while handle != ffi.NULL:
            m = Map._from_object(self, handle)
            found[m.name] = m
            handle = lib.bpf_object__next_map(self._handle, handle)
        return found

    def close(self) -> None:
        if self._handle is not None:
            _bpf().lib.bpf_object__close(self._handle)
            self._handle = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BpfObject({self.path!r})"


def _round_up8(n: int) -> int:
    return (n + 7) & ~7


class Map(MutableMapping[bytes, Any]):
    """A BPF map as a mapping of key bytes to value bytes.

    Per-CPU maps read as a list with one bytes value per possible CPU; they accept either such a
    list or one bytes value, which is then written to every CPU.
    """

    def __init__(self, fd: int, name: str, type: int, key_size: int, value_size: int,
                 max_entries: int, *, owns_fd: bool = False, owner: object = None, id: int = 0) -> None:
        self._fd = fd
        self.id = id  # the kernel's map id, when opened from a pin (0: not asked)
        self.name = name
        self.type = type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._owns_fd = owns_fd
        self._owner = owner  # keeps the BpfObject alive as long as this map is used
        self.percpu = type in PERCPU_MAP_TYPES
        self._ncpus = num_possible_cpus() if self.percpu else 1
        self._slot = _round_up8(value_size) if self.percpu else value_size

    @classmethod
    def _from_object(cls, obj: BpfObject, handle: Any) -> Map:
        lib = _bpf().lib
        return cls(lib.bpf_map__fd(handle), _string(lib.bpf_map__name(handle)), lib.bpf_map__type(handle),
                   lib.bpf_map__key_size(handle), lib.bpf_map__value_size(handle),
                   lib.bpf_map__max_entries(handle), owner=obj)

    @classmethod
    def from_pin(cls, path: str | os.PathLike[str]) -> Map:
        """Open a map pinned in bpffs, e.g. by a server running in another process."""
        path = os.fspath(path)
        ffi, lib = _bpf().ffi, _bpf().lib
        _start_call()
        fd = _check(lib.bpf_obj_get(path.encode()), "bpf_obj_get", path)
        try:
            info = ffi.new("struct bpf_map_info *")
            size = ffi.new("__u32 *", ffi.sizeof("struct bpf_map_info"))
            _check(lib.bpf_obj_get_info_by_fd(fd, info, size), "bpf_obj_get_info_by_fd", path)
            return cls(fd, ffi.string(info.name).decode(), info.type, info.key_size, info.value_size,
                       info.max_entries, owns_fd=True, id=info.id)
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise OSError(errno_mod.EBADF, f"bpf_map__fd({self.name}): map not loaded or closed")
        return self._fd

    def _key(self, key: bytes) -> Any:
        if len(key) != self.key_size:
            raise ValueError(f"map {self.name}: key needs {self.key_size} bytes, got {len(key)}")
        return _bpf().ffi.from_buffer(key)

    def _value_buffer(self) -> Any:
        return _bpf().ffi.new("char[]", self._slot * self._ncpus)

    def _pack_value(self, value: bytes | list[bytes]) -> Any:
        values = value if isinstance(value, list) else [value] * self._ncpus
        if len(values) != self._ncpus:
            raise ValueError(f"map {self.name}: needs {self._ncpus} per-CPU values, got {len(values)}")
        image = bytearray(self._slot * self._ncpus)
        for cpu, one in enumerate(values):
            if len(one) != self.value_size:
                raise ValueError(f"map {self.name}: value needs {self.value_size} bytes, got {len(one)}")
            image[cpu * self._slot:cpu * self._slot + self.value_size] = one
        return _bpf().ffi.from_buffer(image)

    def _unpack_value(self, buf: Any) -> bytes | list[bytes]:
        raw = _bpf().ffi.buffer(buf)[:]
        if not self.percpu:
            return raw[:self.value_size]
        return [raw[cpu * self._slot:cpu * self._slot + self.value_size] for cpu in range(self._ncpus)]

    def __getitem__(self, key: bytes) -> bytes | list[bytes]:
        buf = self._value_buffer()
        _start_call()
        ret = _bpf().lib.bpf_map_lookup_elem(self.fd, self._key(key), buf)
        if ret == -errno_mod.ENOENT:
            raise KeyError(key)
        _check(ret, "bpf_map_lookup_elem", self.name)
        return self._unpack_value(buf)

    def update(self, key: bytes = None, value: Any = None, flags: int = UpdateFlags.ANY, /, **kw: Any) -> None:  # type: ignore[override]
        """`m.update(key, value, flags)` writes one element with BPF_ANY/NOEXIST/EXIST;
        called with a mapping (MutableMapping's form) it writes each item."""
        if isinstance(key, bytes | bytearray) and value is not None:
            _start_call()
            _check(_bpf().lib.bpf_map_update_elem(self.fd, self._key(bytes(key)), self._pack_value(value),
                                                  int(flags)), "bpf_map_update_elem", self.name)
            return
        source = {} if key is None else key
        super().update(source, **kw)  # type: ignore[arg-type]

    def __setitem__(self, key: bytes, value: bytes | list[bytes]) -> None:
        self.update(key, value, UpdateFlags.ANY)

    def __delitem__(self, key: bytes) -> None:
        _start_call()
        ret = _bpf().lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret == -errno_mod.ENOENT:
            raise KeyError(key)
        _check(ret, "bpf_map_delete_elem", self.name)

    def __iter__(self) -> Iterator[bytes]:
        ffi, lib = _bpf().ffi, _bpf().lib
        current = ffi.NULL
        nxt = ffi.new("char[]", self.key_size)
        while True:
            _start_call()
            ret = lib.bpf_map_get_next_key(self.fd, current, nxt)
            if ret == -errno_mod.ENOENT:
                return
            _check(ret, "bpf_map_get_next_key", self.name)
            key = ffi.buffer(nxt)[:]
            yield key
            current = ffi.from_buffer(key)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes | bytearray):
            return False
        try:
            self[bytes(key)]
        except KeyError:
            return False
        return True

    def pin(self, path: str | os.PathLike[str]) -> None:
        obj_pin(self.fd, path, self.name)

    def close(self) -> None:
        if self._owns_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> Map:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Map({self.name!r}, type={self.type}, key_size={self.key_size}, "
                f"value_size={self.value_size}, max_entries={self.max_entries})")


def obj_pin(fd: int, path: str | os.PathLike[str], what: str = "") -> None:
    """Pin a map, program or link fd at path (in bpffs)."""
    path = os.fspath(path)
    _start_call()
    _check(_bpf().lib.bpf_obj_pin(fd, path.encode()), "bpf_obj_pin", f"{what} at {path}" if what else path)


def unpin(path: str | os.PathLike[str]) -> None:
    """Remove a pin; the object lives on while something else holds it."""
    os.unlink(path)


BPF_OBJ_NAME_LEN = 16


def kernel_name(name: str) -> str:
    """How the kernel reports a program or map name: cut to BPF_OBJ_NAME_LEN - 1 characters."""
    return name[:BPF_OBJ_NAME_LEN - 1]


class ProgInfo(NamedTuple):
    id: int
    type: int
    name: str  # as the kernel keeps it, see kernel_name()
    map_ids: tuple[int, ...] = ()  # the maps it uses


def prog_info(prog_id: int) -> ProgInfo:
    """Name, type and maps of a loaded program, looked up by its id (e.g. from tc_query/xdp_query)."""
    ffi, lib = _bpf().ffi, _bpf().lib
    _start_call()
    fd = _check(lib.bpf_prog_get_fd_by_id(prog_id), "bpf_prog_get_fd_by_id", prog_id)
    try:
        info = ffi.new("struct bpf_prog_info_head *")
        size = ffi.new("__u32 *", ffi.sizeof("struct bpf_prog_info_head"))
        _check(lib.bpf_obj_get_info_by_fd(fd, info, size), "bpf_obj_get_info_by_fd", f"prog {prog_id}")
        count = info.nr_map_ids
        ids = ffi.new("__u32[]", max(count, 1))
        again = ffi.new("struct bpf_prog_info_head *", {"nr_map_ids": count,
                                                        "map_ids": int(ffi.cast("uintptr_t", ids))})
        size[0] = ffi.sizeof("struct bpf_prog_info_head")
        _check(lib.bpf_obj_get_info_by_fd(fd, again, size), "bpf_obj_get_info_by_fd", f"prog {prog_id}")
        return ProgInfo(info.id, info.type, ffi.string(info.name).decode(),
                        tuple(ids[i] for i in range(min(count, again.nr_map_ids))))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Links, ring buffer, test runs


class Link:
    """An attachment held by a BPF link; destroy() (or the last fd closing) detaches it."""

    def __init__(self, *, handle: Any = None, fd: int = -1, name: str = "xdp") -> None:
        self._handle = handle  # struct bpf_link * from libbpf
        self._fd = fd  # or a bare link fd from bpf_link_create
        self.name = name  # what it attaches, for error messages

    @property
    def fd(self) -> int:
        if self._handle is not None:
            return _bpf().lib.bpf_link__fd(self._handle)
        if self._fd < 0:
            raise OSError(errno_mod.EBADF, "bpf_link__fd: link destroyed")
        return self._fd

    def pin(self, path: str | os.PathLike[str]) -> None:
        obj_pin(self.fd, path, "link")

    def destroy(self) -> None:
        if self._handle is not None:
            _start_call()
            handle, self._handle = self._handle, None
            _check(_bpf().lib.bpf_link__destroy(handle), "bpf_link__destroy", self.name)
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def xdp_link_create(prog_fd: int, ifindex: int, flags: int = XdpFlags.NONE) -> Link:
    """XDP through a BPF link with an explicit mode (XdpFlags.SKB_MODE or DRV_MODE)."""
    ffi, lib = _bpf().ffi, _bpf().lib
    opts = ffi.new("struct bpf_link_create_opts *")
    opts.sz = ffi.sizeof("struct bpf_link_create_opts")
    opts.flags = int(flags)
    _start_call()
    fd = _check(lib.bpf_link_create(prog_fd, ifindex, BPF_XDP_ATTACH_TYPE, opts),
                "bpf_link_create", f"xdp ifindex {ifindex}, flags {int(flags):#x}")
    return Link(fd=fd)


class RingBuffer:
    """Consumes a BPF ring buffer map: callback(data: bytes) runs for every record in poll()."""

    def __init__(self, ring: Map, callback: Callable[[bytes], object]) -> None:
        ffi, lib = _bpf().ffi, _bpf().lib
        self._callback = callback
        self._failure: BaseException | None = None
        self._sample_fn = ffi.callback("ring_buffer_sample_fn", self._on_sample)
        _start_call()
        self._handle = _check_ptr(lib.ring_buffer__new(ring.fd, self._sample_fn, ffi.NULL, ffi.NULL),
                                  "ring_buffer__new", ring.name)
        self.name = ring.name
        self._ring = ring

    def _on_sample(self, ctx: Any, data: Any, size: int) -> int:
        try:
            self._callback(_bpf().ffi.buffer(data, size)[:])
            return 0
        except BaseException as exc:  # re-raised from poll(); a C frame cannot carry it
            self._failure = exc
            return -errno_mod.ECANCELED

    def _run(self, call: str, ret: int) -> int:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
        if ret == -errno_mod.EINTR:
            return 0
        return _check(ret, call, self.name)

    def poll(self, timeout_ms: int = 0) -> int:
        """Wait up to timeout_ms for records and handle them; returns how many were handled."""
        _start_call()
        return self._run("ring_buffer__poll", _bpf().lib.ring_buffer__poll(self._live(), timeout_ms))

    def consume(self) -> int:
        _start_call()
        return self._run("ring_buffer__consume", _bpf().lib.ring_buffer__consume(self._live()))

    @property
    def epoll_fd(self) -> int:
        return _bpf().lib.ring_buffer__epoll_fd(self._live())

    def _live(self) -> Any:
        if self._handle is None:
            raise OSError(errno_mod.EBADF, f"ring_buffer({self.name}): closed")
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            _bpf().lib.ring_buffer__free(self._handle)
            self._handle = None

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TestRun(NamedTuple):
    retval: int
    data_out: bytes
    ctx_out: bytes | None


TestRun.__test__ = False  # type: ignore[attr-defined]  # not a pytest class


def prog_test_run(prog_fd: int, data_in: bytes, repeat: int = 1, ctx_in: bytes | None = None,
                  *, data_out_size: int = 65536) -> TestRun:
    """Run a program on one packet with BPF_PROG_TEST_RUN; returns verdict, packet, context."""
    ffi, lib = _bpf().ffi, _bpf().lib
    opts = ffi.new("struct bpf_test_run_opts *")
    opts.sz = ffi.sizeof("struct bpf_test_run_opts")
    data_buf = ffi.from_buffer(data_in)
    out_buf = ffi.new("char[]", max(data_out_size, len(data_in)))
    opts.data_in, opts.data_size_in = data_buf, len(data_in)
    opts.data_out, opts.data_size_out = out_buf, len(out_buf)
    opts.repeat = repeat
    ctx_buf = ctx_out = None
    if ctx_in is not None:
        ctx_buf = ffi.from_buffer(ctx_in)
        ctx_out = ffi.new("char[]", max(len(ctx_in), 1))
        opts.ctx_in, opts.ctx_size_in = ctx_buf, len(ctx_in)
        opts.ctx_out, opts.ctx_size_out = ctx_out, len(ctx_out)
    _start_call()
    _check(lib.bpf_prog_test_run_opts(prog_fd, opts), "bpf_prog_test_run_opts", f"prog fd {prog_fd}")
    out_ctx = ffi.buffer(ctx_out, opts.ctx_size_out)[:] if ctx_out is not None else None
    return TestRun(opts.retval, ffi.buffer(out_buf, opts.data_size_out)[:], out_ctx)


# ---------------------------------------------------------------------------------------------
# TC (clsact) and XDP attachments by netlink


class TcFilter(NamedTuple):
    ifindex: int
    handle: int
    priority: int
    prog_id: int


def _tc_hook(ifindex: int, attach_point: int) -> Any:
    ffi = _bpf().ffi
    hook = ffi.new("struct bpf_tc_hook *")
    hook.sz = ffi.sizeof("struct bpf_tc_hook")
    hook.ifindex = ifindex
    hook.attach_point = int(attach_point)
    return hook


def _tc_opts(handle: int = 0, priority: int = 0, prog_fd: int = 0, flags: int = 0) -> Any:
    ffi = _bpf().ffi
    opts = ffi.new("struct bpf_tc_opts *")
    opts.sz = ffi.sizeof("struct bpf_tc_opts")
    opts.handle, opts.priority, opts.prog_fd, opts.flags = handle, priority, prog_fd, flags
    return opts


def tc_hook_create(ifindex: int, attach_point: int = TcAttachPoint.INGRESS) -> bool:
    """Add the clsact qdisc; True if this call created it, False if it was already there."""
    _start_call()
    ret = _bpf().lib.bpf_tc_hook_create(_tc_hook(ifindex, attach_point))
    if ret == -errno_mod.EEXIST:
        return False
    _check(ret, "bpf_tc_hook_create", f"ifindex {ifindex}")
    return True


def tc_hook_destroy(ifindex: int, attach_point: int = TcAttachPoint.INGRESS | TcAttachPoint.EGRESS) -> None:
    """INGRESS|EGRESS removes the clsact qdisc; one direction flushes that direction's filters."""
    _start_call()
    _check(_bpf().lib.bpf_tc_hook_destroy(_tc_hook(ifindex, attach_point)),
           "bpf_tc_hook_destroy", f"ifindex {ifindex}")


def tc_attach(ifindex: int, prog_fd: int, *, handle: int = 0, priority: int = 0, replace: bool = False,
              attach_point: int = TcAttachPoint.INGRESS) -> TcFilter:
    """Attach a direct-action filter to an existing clsact hook (see tc_hook_create)."""
    opts = _tc_opts(handle, priority, prog_fd, BPF_TC_F_REPLACE if replace else 0)
    _start_call()
    _check(_bpf().lib.bpf_tc_attach(_tc_hook(ifindex, attach_point), opts), "bpf_tc_attach",
           f"ifindex {ifindex}, handle {handle:#x}, priority {priority}")
    return TcFilter(ifindex, opts.handle, opts.priority, opts.prog_id)


def tc_detach(ifindex: int, handle: int, priority: int, attach_point: int = TcAttachPoint.INGRESS) -> None:
    _start_call()
    _check(_bpf().lib.bpf_tc_detach(_tc_hook(ifindex, attach_point), _tc_opts(handle, priority)),
           "bpf_tc_detach", f"ifindex {ifindex}, handle {handle:#x}, priority {priority}")


def tc_query(ifindex: int, handle: int, priority: int, attach_point: int = TcAttachPoint.INGRESS) -> int | None:
    """Program id of the filter at (handle, priority), or None when there is none."""
    opts = _tc_opts(handle, priority)
    _start_call()
    _thread_state.quiet = True  # "no such filter" is an answer here, not a warning
    try:
        ret = _bpf().lib.bpf_tc_query(_tc_hook(ifindex, attach_point), opts)
    finally:
        _thread_state.quiet = False
    if ret in (-errno_mod.ENOENT, -errno_mod.EINVAL):  # EINVAL: no clsact qdisc on the device
        return None
    _check(ret, "bpf_tc_query", f"ifindex {ifindex}, handle {handle:#x}, priority {priority}")
    return opts.prog_id


class XdpInfo(NamedTuple):
    prog_id: int  # the single attached program, 0 when none
    drv_prog_id: int
    skb_prog_id: int
    hw_prog_id: int
    attach_mode: XdpAttachMode


def xdp_attach(ifindex: int, prog_fd: int, flags: int = XdpFlags.NONE) -> None:
    """Attach by netlink (survives the process; prefer Program.attach_xdp or xdp_link_create)."""
    _start_call()
    _check(_bpf().lib.bpf_xdp_attach(ifindex, prog_fd, int(flags), _bpf().ffi.NULL),
           "bpf_xdp_attach", f"ifindex {ifindex}, flags {int(flags):#x}")


def xdp_detach(ifindex: int, flags: int = XdpFlags.NONE) -> None:
    _start_call()
    _check(_bpf().lib.bpf_xdp_detach(ifindex, int(flags), _bpf().ffi.NULL),
           "bpf_xdp_detach", f"ifindex {ifindex}, flags {int(flags):#x}")


def xdp_query(ifindex: int) -> XdpInfo:
    ffi = _bpf().ffi
    opts = ffi.new("struct bpf_xdp_query_opts *")
    opts.sz = ffi.sizeof("struct bpf_xdp_query_opts")
    _start_call()
    _check(_bpf().lib.bpf_xdp_query(ifindex, 0, opts), "bpf_xdp_query", f"ifindex {ifindex}")
    mode = opts.attach_mode
    return XdpInfo(opts.prog_id, opts.drv_prog_id, opts.skb_prog_id, opts.hw_prog_id,
                   XdpAttachMode(mode) if mode in XdpAttachMode._value2member_map_ else XdpAttachMode.NONE)


# ---------------------------------------------------------------------------------------------
# The ABI header shared with the BPF programs


class Abi:
    """Structs, enums and constants of bpf/fileserver.h, read with cffi so nothing is copied."""

    def __init__(self, header_path: str | os.PathLike[str]) -> None:
        import cffi

        self.path = Path(header_path)
        text = self.path.read_text()
        self._ffi = cffi.FFI()
        try:
            self._ffi.cdef(_FIXED_WIDTH_TYPES + _strip_preprocessor_guard(text))
        except cffi.CDefError as exc:
            raise ValueError(f"{self.path}: not parseable as the shared ABI: {exc}") from None
        self._consts = self._ffi.dlopen(None)

    def enum(self, name: str) -> dict[str, int]:
        """`enum name` as {member: value}, in value order."""
        members = self._ffi.typeof(f"enum {name}").relements
        return dict(sorted(members.items(), key=lambda item: item[1]))

    def sizeof(self, ctype: str) -> int:
        return self._ffi.sizeof(ctype)

    def const(self, name: str) -> int:
        try:
            return getattr(self._consts, name)
        except AttributeError:
            raise KeyError(f"{name}: no such constant in {self.path}") from None

    def pack(self, ctype: str, fields: dict[str, Any]) -> bytes:
        """The struct's bytes with the given fields set and every other byte zero."""
        cdata = self._ffi.new(f"{ctype} *")
        self._fill(cdata[0], fields, ctype)
        return bytes(self._ffi.buffer(cdata))

    def unpack(self, ctype: str, data: bytes) -> dict[str, Any]:
        size = self._ffi.sizeof(ctype)
        if len(data) < size:
            raise ValueError(f"unpack({ctype}): needs {size} bytes, got {len(data)}")
        cdata = self._ffi.from_buffer(f"{ctype} *", bytearray(data[:size]))
        return self._to_python(cdata[0])

    def _fill(self, target: Any, fields: dict[str, Any], ctype: str) -> None:
        known = dict(self._ffi.typeof(target).fields)
        for name, value in fields.items():
            if name not in known:
                raise KeyError(f"{ctype} has no field {name!r}")
            ftype = known[name].type
            if ftype.kind == "struct":
                self._fill(getattr(target, name), value, f"{ctype}.{name}")
            elif ftype.kind == "array" and isinstance(value, bytes | bytearray):
                if len(value) > ftype.length * self._ffi.sizeof(ftype.item):
                    raise ValueError(f"{ctype}.{name}: {len(value)} bytes do not fit")
                self._ffi.memmove(getattr(target, name), value, len(value))
            elif ftype.kind == "array":
                field = getattr(target, name)
                if len(value) > ftype.length:
                    raise ValueError(f"{ctype}.{name}: {len(value)} items do not fit")
                for i, item in enumerate(value):
                    field[i] = item
            else:
                setattr(target, name, value)

    def _to_python(self, cdata: Any) -> Any:
        if not isinstance(cdata, self._ffi.CData):  # primitives arrive as Python ints already
            return cdata
        ctype = self._ffi.typeof(cdata)
        if ctype.kind == "struct":
            return {name: self._to_python(getattr(cdata, name)) for name, _ in ctype.fields}
        if ctype.kind == "array":
            if ctype.item.kind == "primitive" and self._ffi.sizeof(ctype.item) == 1:
                return bytes(self._ffi.buffer(cdata))
            return [self._to_python(item) for item in cdata]
        return cdata


def _strip_preprocessor_guard(text: str) -> str:
    """Drop the include guard (#ifndef X / #define X / #endif) and #pragma once; cffi keeps
    `#define NAME <integer>` constants."""
    kept = []
    for line in text.splitlines():
        words = line.split()
        if words and (words[0] in ("#ifndef", "#endif", "#pragma", "#ifdef")
                      or (words[0] == "#define" and len(words) == 2)):
            continue
        kept.append(line)
    return "\n".join(kept)
