"""`fsctl doctor`: can this machine run the kernel fast path? One line per check; a failed or
degraded check says what to do on the same line. Exit 0 when every essential check passes."""

from __future__ import annotations

import errno
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import config

MIN_KERNEL = (6, 9)  # bpf_sk_assign_tcp_reqsk() arrived in 6.9
VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
SYNCOOKIES = Path("/proc/sys/net/ipv4/tcp_syncookies")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "warn" (works, degraded or informational) or "fail"
    detail: str
    fix: str = ""  # what to do, for warn and fail
    essential: bool = True  # a failure makes `fsctl up` impossible

    def line(self) -> str:
        mark = {"ok": "ok", "warn": "warn", "fail": "FAIL"}[self.status]
        text = f"{mark:<5} {self.name}: {self.detail}"
        return f"{text} — {self.fix}" if self.fix and self.status != "ok" else text


def check_kernel() -> Check:
    release = platform.release()
    numbers = re.match(r"(\d+)\.(\d+)", release)
    version = (int(numbers.group(1)), int(numbers.group(2))) if numbers else (0, 0)
    if version >= MIN_KERNEL:
        return Check("kernel", "ok", release)
    return Check("kernel", "fail", f"{release} is older than {MIN_KERNEL[0]}.{MIN_KERNEL[1]}",
                 f"boot Linux >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} (bpf_sk_assign_tcp_reqsk), or serve with fsctl up -n")


def check_btf() -> Check:
    if VMLINUX_BTF.exists():
        return Check("BTF", "ok", str(VMLINUX_BTF))
    return Check("BTF", "fail", f"{VMLINUX_BTF} missing", "boot a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def check_privileges() -> Check:
    from .cli import can_attach

    if os.geteuid() == 0:
        return Check("privileges", "ok", "root")
    if can_attach():
        return Check("privileges", "ok", "CAP_BPF and CAP_NET_ADMIN")
    return Check("privileges", "fail", f"uid {os.geteuid()} without CAP_BPF and CAP_NET_ADMIN",
                 "run as root: sudo .venv/bin/fsctl ...")


def check_bpffs() -> Check:
    from .kernel import BPFFS

    if BPFFS.is_mount():
        return Check("bpffs", "ok", f"mounted on {BPFFS}", essential=False)
    return Check("bpffs", "warn", f"not mounted on {BPFFS}",
                 f"fsctl up mounts it; by hand: mount -t bpf bpf {BPFFS}", essential=False)


def check_libbpf() -> Check:
    from . import libbpf

    try:
        version = libbpf.libbpf_version()
    except OSError as exc:
        return Check("libbpf", "fail", str(exc.strerror or exc), "apt-get install libbpf1")
    return Check("libbpf", "ok", f"libbpf.so.1 {version}")


def check_clang() -> Check:
    clang = shutil.which("clang-16") or shutil.which("clang")
    built = config.BPF_OBJECT.exists()
    if clang is None:
        return Check("clang", "warn" if built else "fail", "clang-16 not found",
                     "apt-get install clang-16 llvm-16 (needed to rebuild bpf/)", essential=not built)
    first = subprocess.run([clang, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    return Check("clang", "ok", first[0] if first else clang, essential=not built)


def check_object() -> Check:
    from . import libbpf
    from .cli import can_attach

    obj_path = config.BPF_OBJECT
    if not obj_path.exists():
        return Check("BPF object", "fail", f"{obj_path} not built", "run: make -C bpf")
    if not can_attach():
        return Check("BPF object", "warn", f"{obj_path} built; loading it needs root", "run fsctl doctor as root")
    try:
        with libbpf.BpfObject.open(obj_path) as obj:
            layout = obj.rodata_vars()
            if "server_port" in layout:
                obj.set_rodata("server_port", (8080).to_bytes(layout["server_port"][1], "little"))
            obj.load()
            names = ", ".join(p.name for p in obj.programs())
    except OSError as exc:
        return Check("BPF object", "fail", f"{obj_path} does not load: {str(exc.strerror).splitlines()[0]}",
                     "see the verifier log with: make -C bpf check")
    return Check("BPF object", "ok", f"{obj_path.name} loads ({names})")


def check_clsact() -> Check:
    from .cli import can_attach
    from .kernel import probe_clsact

    if not can_attach():
        return Check("clsact", "warn", "not checked without root", "run fsctl doctor as root")
    try:
        probe_clsact(1, "lo")  # under the servers' lock: none attaches to it in between
    except OSError as exc:
        return Check("clsact", "fail", f"cannot add a clsact qdisc: {str(exc.strerror).splitlines()[0]}",
                     "load sch_ingress (CONFIG_NET_SCH_INGRESS): modprobe sch_ingress")
    return Check("clsact", "ok", "clsact qdisc available")


def coherence_without_fentry() -> str:
    """How the kernel cache follows file changes when fentry (a hook on file writes) is refused:
    cache.py, which implements it, says so in COHERENCE_WITHOUT_FENTRY."""
    try:
        from .cache import COHERENCE_WITHOUT_FENTRY
    except ImportError:
        return "cache entries are refreshed from user space only (fileserver_ctl/cache.py)"
    return str(COHERENCE_WITHOUT_FENTRY)


def check_fentry() -> Check:
    from . import libbpf
    from .cli import can_attach

    if not can_attach():
        return Check("fentry", "warn", "not checked without root", "run fsctl doctor as root", essential=False)
    try:
        libbpf.probe_fentry()
    except OSError as exc:
        why = "kernel locked down for integrity?" if exc.errno == errno.EPERM else os.strerror(exc.errno or 0)
        return Check("fentry", "warn", f"refused ({errno.errorcode.get(exc.errno or 0, exc.errno)}, {why})",
                     f"expected on hardened kernels; cache coherence: {coherence_without_fentry()}", essential=False)
    return Check("fentry", "ok", "fentry programs load", essential=False)


def check_syncookies() -> Check:
    try:
        value = int(SYNCOOKIES.read_text())
    except (OSError, ValueError) as exc:
        return Check("tcp_syncookies", "warn", f"unreadable: {exc}", "check /proc/sys/net/ipv4", essential=False)
    if value in (1, 2):
        return Check("tcp_syncookies", "ok", str(value), essential=False)
    return Check("tcp_syncookies", "warn", str(value),
                 "fsctl up sets it to 1 while it runs (the hand-off needs 1 or 2)", essential=False)


CHECKS: tuple[Callable[[], Check], ...] = (
    check_kernel, check_btf, check_privileges, check_bpffs, check_libbpf, check_clang,
    check_object, check_clsact, check_fentry, check_syncookies,
)


def run_checks() -> Iterator[Check]:
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            yield check()
        except Exception as exc:  # a broken probe is a failed check, never a traceback
            yield Check(name, "fail", f"check crashed: {type(exc).__name__}: {exc}", "report this as a bug")


def run_doctor(emit: Callable[[str], None] | None = None) -> int:
    from .cli import ExitStatus, out

    emit = emit or out
    failed = 0
    for result in run_checks():
        emit(result.line())
        failed += result.status == "fail" and result.essential
    if failed:
        emit(f"{failed} essential check{'s' if failed > 1 else ''} failed")
        return ExitStatus.CHECK_FAILED
    emit("All essential checks passed")
    return ExitStatus.SUCCESS
