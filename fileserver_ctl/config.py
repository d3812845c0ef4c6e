"""Run-time settings shared by the CLI, the kernel lifecycle and the user-space server."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# FILESERVER_BPF_DIR points at another build of bpf/ (tests of an older object); empty = unset
BPF_DIR = Path(os.environ.get("FILESERVER_BPF_DIR") or REPO_ROOT / "bpf")
BPF_OBJECT = BPF_DIR / "fileserver.bpf.o"
ABI_HEADER = BPF_DIR / "fileserver.h"
DEFAULT_DOCROOT = REPO_ROOT / "www"
PIN_ROOT = Path("/sys/fs/bpf/fileserver")


def pin_dir(port: int) -> Path:
    """Where one server's maps and links are pinned, so a later start can find them."""
    return PIN_ROOT / str(port)


@dataclass
class Settings:
    interface: str = "lo"
    port: int = 8080
    docroot: Path = DEFAULT_DOCROOT
    kernel_cache: bool = True
    verbose: bool = False
    host: str = ""  # "" = every address, IPv4 and IPv6
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    access_log: Path | None = None
    autoindex: bool = False
    metrics: str | None = None  # "ADDR:PORT" for Prometheus, off when None
    cache_size: int = 64 << 20  # kernel cache budget in bytes
    cache_max_file: int = 256 << 10  # largest body the kernel answers (bpf FS_BODY_MAX)
    deny: list[str] = field(default_factory=list)  # CIDRs whose traffic XDP drops
    syn_rate: int = 0  # new connections per second per client; 0 = no limit

    @property
    def logs_requests(self) -> bool:
        """An access log is written: to a file, or to stdout in verbose mode."""
        return self.access_log is not None or self.verbose

    @classmethod
    def from_env(cls) -> "Settings":
        """Defaults overridden by FILESERVER_* environment variables; flags override these."""
        s = cls()
        env = os.environ
        if "FILESERVER_INTERFACE" in env:
            s.interface = env["FILESERVER_INTERFACE"]
        if "FILESERVER_PORT" in env:
            s.port = _env_port(env["FILESERVER_PORT"])
        if "FILESERVER_DOCROOT" in env:
            if not env["FILESERVER_DOCROOT"]:  # Path("") is ".": never serve the cwd by accident
                raise ValueError("invalid FILESERVER_DOCROOT '': expected a directory")
            s.docroot = Path(env["FILESERVER_DOCROOT"])
        if "FILESERVER_KERNEL_PROCESSING" in env:
            s.kernel_cache = _env_switch("FILESERVER_KERNEL_PROCESSING", env["FILESERVER_KERNEL_PROCESSING"])
        for name, default in TIMEOUTS.items():
            env_seconds(name, default)  # read at import by the server: a bad value is said here
        return s


def is_number(text: str) -> bool:
    """Only ASCII digits: int() would also take '٣', ' 8', '+8' and '8_0'."""
    return text.isascii() and text.isdigit()


def port_number(text: str) -> int | None:
    """A TCP port 1-65535 written in ASCII digits, else None."""
    port = int(text) if is_number(text) else 0
    return port if 1 <= port <= 65535 else None


def _env_port(value: str) -> int:
    port = port_number(value)
    if port is None:
        raise ValueError(f"invalid FILESERVER_PORT {value!r}: expected a port number 1-65535")
    return port


# Timeouts in seconds that the server reads from the environment, and their defaults: nginx's
# (keepalive_timeout 75s, client_header_timeout 60s), what a client tuned against it expects.
TIMEOUTS = {"FILESERVER_KEEPALIVE_TIMEOUT": 75.0, "FILESERVER_HEADER_TIMEOUT": 60.0}


def env_seconds(name: str, default: float) -> float:
    """A timeout variable: a finite number of seconds >= 0; unset or empty = the default."""
    value = os.environ.get(name, "")
    if not value.strip():
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):  # also refuses nan
        raise ValueError(f"invalid {name} {value!r}: expected a number of seconds, e.g. {default:g}")
    return seconds


SWITCH_VALUES = {"1": True, "true": True, "yes": True, "on": True,
                 "0": False, "false": False, "no": False, "off": False}


def _env_switch(name: str, value: str) -> bool:
    """An on/off variable: a value that is neither is a mistake to report, not a guess."""
    try:
        return SWITCH_VALUES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"invalid {name} {value!r}: expected 1 or 0 (true/false, yes/no, on/off)") from None
