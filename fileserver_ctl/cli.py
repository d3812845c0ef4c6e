"""fsctl: parse the command line, run the command, turn every failure into one line and an exit code.

    fsctl up      attach the kernel fast path and serve a directory until SIGINT/SIGTERM
    fsctl down    stop the server of a port and remove whatever it left in the kernel
    fsctl stats   counters of a running server (--json for scripts)
    fsctl top     live view of a running server
    fsctl deny    drop a network's traffic to a running server (fsctl allow takes it back)
    fsctl doctor  check that this machine can run the fast path
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import importlib.util
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

from . import __version__, config
from .config import Settings

log = logging.getLogger("fileserver.cli")

RUN_ROOT = Path("/run/fileserver")
STOP_TIMEOUT = 10.0  # seconds `fsctl down` waits for a server to exit before SIGKILL
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# Each worker is a process of some 25 MiB: a typo (--workers 5000) must not fork until the OOM
# killer steps in (it did here, taking other processes with it). One per CPU is the default.
WORKERS_MAX = 256


class ExitStatus(IntEnum):
    SUCCESS = 0
    ERROR = 1  # the command ran and failed
    USAGE = 2  # bad flag, value or environment variable
    NO_SERVER = 3  # stats/top: nothing runs on that port
    NO_PERMISSION = 4  # needs root (CAP_BPF + CAP_NET_ADMIN)
    PORT_IN_USE = 5
    CHECK_FAILED = 6  # doctor: an essential check failed
    INTERRUPTED = 130  # Ctrl-C before the server was up
    BROKEN_PIPE = 141  # stdout closed (`fsctl stats | head`), as a shell reports SIGPIPE


class CliError(Exception):
    """A failure the user can act on: str() is the one line printed."""

    def __init__(self, message: str, status: ExitStatus = ExitStatus.ERROR) -> None:
        super().__init__(message)
        self.status = status


class Terminated(BaseException):
    """SIGTERM or SIGHUP outside serve(): unwinds like Ctrl-C so that everything is detached."""


def out(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------------------------
# Arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see: {self.prog} -h)", ExitStatus.USAGE)


def _port(text: str) -> int:
    port = config.port_number(text)
    if port is None:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: expected 1-65535")
    return port


def _workers(text: str) -> int:
    if not config.is_number(text) or not 1 <= int(text) <= WORKERS_MAX:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected 1-{WORKERS_MAX} worker processes")
    return int(text)


def _cidr(text: str) -> Any:
    from .policy import parse_cidr

    try:
        return parse_cidr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _syn_rate(text: str) -> int:
    from .policy import SYN_RATE_MAX

    if not config.is_number(text) or not 1 <= int(text) <= SYN_RATE_MAX:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: expected 1-{SYN_RATE_MAX} new connections "
                                         "per second")
    return int(text)


def parse_size(text: str) -> int:
    """'64M', '512k', '1G', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]+)\s*([kmg]?)i?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected e.g. 64M, 512k, 1G")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).lower()]


def _docroot(text: str) -> Path:
    if not text:  # Path("") is ".": an empty value must not serve the current directory
        raise argparse.ArgumentTypeError("invalid document root '': expected a directory")
    return Path(text)


def _log_file(text: str) -> Path:
    if not text:
        raise argparse.ArgumentTypeError("invalid access log '': expected a file name")
    return Path(text)


def _env_settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise CliError(str(exc), ExitStatus.USAGE) from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fsctl", description="Static file server with an eBPF fast path.")
    parser.add_argument("-V", "--version", action="version", version=f"fsctl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    port_help = "server port (default: $FILESERVER_PORT or 8080)"
    up = commands.add_parser("up", help="attach the fast path and serve a directory")
    up.add_argument("-v", "--verbose", action="count", default=0,
                    help="log what happens and every request; -vv adds libbpf's own messages")
    up.add_argument("-i", "--interface", help="interface to attach to (default: $FILESERVER_INTERFACE or lo)")
    up.add_argument("-p", "--port", type=_port, help=port_help)
    up.add_argument("-d", "--docroot", type=_docroot, help="directory to serve (default: $FILESERVER_DOCROOT or ./www)")
    up.add_argument("-n", "--no-kernel-cache", action="store_true",
                    help="serve everything from user space (nothing attached), for comparison")
    up.add_argument("--workers", type=_workers, help="user-space worker processes (default: one per CPU)")
    up.add_argument("--access-log", type=_log_file, metavar="FILE", help="write an nginx-style access log")
    up.add_argument("--autoindex", action="store_true", help="list directories without an index.html")
    up.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics at HOST:PORT")
    up.add_argument("--cache-size", type=parse_size, metavar="SIZE", help="kernel cache budget (e.g. 64M)")
    up.add_argument("--deny", action="append", type=_cidr, default=[], metavar="CIDR",
                    help="drop this network's traffic to the port (repeatable; later: fsctl deny/allow)")
    up.add_argument("--syn-rate", type=_syn_rate, metavar="N",
                    help="new connections per second one client may open (default: no limit)")

    down = commands.add_parser("down", help="stop the server of a port and remove its leftovers")
    down.add_argument("-p", "--port", type=_port, help=port_help)

    stats = commands.add_parser("stats", help="counters of a running server")
    stats.add_argument("-p", "--port", type=_port, help=port_help)
    stats.add_argument("--json", action="store_true", help="machine-readable output")

    top = commands.add_parser("top", help="live view of a running server")
    top.add_argument("-p", "--port", type=_port, help=port_help)
    top.add_argument("--once", action="store_true", help="print one frame and exit")

    deny = commands.add_parser("deny", help="drop a network's traffic to a running server (no CIDR: list)")
    deny.add_argument("cidr", nargs="?", type=_cidr, metavar="CIDR", help="address or network, e.g. 203.0.113.0/24")
    deny.add_argument("-p", "--port", type=_port, help=port_help)
    allow = commands.add_parser("allow", help="take a network off a running server's deny list")
    allow.add_argument("cidr", type=_cidr, metavar="CIDR", help="as it was denied, e.g. 203.0.113.0/24")
    allow.add_argument("-p", "--port", type=_port, help=port_help)

    commands.add_parser("doctor", help="check that this machine can run the fast path")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then FILESERVER_* variables, then flags."""
    settings = _env_settings()
    if getattr(args, "port", None) is not None:
        settings.port = args.port
    if args.command != "up":
        return settings
    if args.interface is not None:
        settings.interface = args.interface
    if args.docroot is not None:
        settings.docroot = args.docroot
    if args.no_kernel_cache:
        settings.kernel_cache = False
    settings.verbose = args.verbose > 0
    if args.workers is not None:
        settings.workers = args.workers
    settings.access_log = args.access_log
    settings.autoindex = args.autoindex
    settings.metrics = args.metrics
    if args.cache_size is not None:
        settings.cache_size = args.cache_size
    settings.deny = [str(network) for network in args.deny]
    if args.syn_rate is not None:
        settings.syn_rate = args.syn_rate
    return settings


# ---------------------------------------------------------------------------------------------
# Checks shared by up and doctor


def effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def can_attach() -> bool:
    """Root, or the capabilities loading and attaching need."""
    caps = effective_capabilities()
    return os.geteuid() == 0 or all(caps >> cap & 1 for cap in (CAP_BPF, CAP_NET_ADMIN))


def _sysctl_int(name: str, default: int) -> int:
    try:
        return int(Path("/proc/sys", name).read_text())
    except (OSError, ValueError):
        return default


def interface_up(name: str) -> bool:
    """Whether the interface is administratively up (IFF_UP); True when that cannot be read."""
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
    except (OSError, ValueError):
        return True
    return bool(flags & 0x1)


def port_in_use(port: int, host: str = "") -> bool:
    """Whether a listener already holds the port (bound the way the server binds it)."""
    families = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")] if not host else [
        (info[0], info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[:1]]
    for family, addr in families:
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((addr, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
                raise
    return False


def shown(path: Path) -> str:
    """A path as a message shows it: quoted with escapes when it holds a newline, a control
    character or bytes that are not UTF-8, so that the message stays one readable line."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def display_path(path: Path) -> str:
    """./www for a path under the current directory, the absolute path otherwise."""
    absolute = path.resolve()
    try:
        rel = absolute.relative_to(Path.cwd().resolve())
    except ValueError:
        return str(absolute)
    return "." if rel == Path(".") else f"./{rel}"


# ---------------------------------------------------------------------------------------------
# The pid file: /run/fileserver/<port>.pid, flock()ed while the server runs


def pid_path(port: int) -> Path:
    return RUN_ROOT / f"{port}.pid"


@contextmanager
def pid_file(port: int) -> Iterator[None]:
    path = pid_path(port)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except PermissionError:
        if can_attach():
            raise
        # `fsctl up -n` as a user: /run is root's. The server runs all the same (Ctrl-C stops
        # it; a second one meets the port in use); only `fsctl down` cannot find it.
        log.info("no pid file: %s is not writable, so fsctl down -p %d will not find this server",
                 path.parent, port)
        yield
        return
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise CliError(f"a file server is already running on port {port} (pid {f.read().strip() or '?'}); "
                           f"stop it with: fsctl down -p {port}", ExitStatus.PORT_IN_USE) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
    finally:
        f.close()


def running_pid(port: int) -> int | None:
    """Pid of the live server of the port (its pid file is locked), else None."""
    try:
        f = open(pid_path(port))
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            text = f.read().strip()
            return int(text) if text.isdigit() else None
        return None


def _after_fork_in_worker() -> None:
    """A forked worker takes the default SIGHUP action, not the parent's unwinding handler (it
    would print a traceback there). server.py makes workers die with the supervisor."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# fsctl up


def _validate_up(settings: Settings) -> None:
    docroot = Path(settings.docroot)
    if not docroot.exists():
        raise CliError(f"document root {shown(docroot)} does not exist", ExitStatus.USAGE)
    if not docroot.is_dir():
        raise CliError(f"document root {shown(docroot)} is not a directory", ExitStatus.USAGE)
    if settings.kernel_cache:
        try:
            socket.if_nametoindex(settings.interface)
        except OSError:
            names = ", ".join(name for _, name in socket.if_nameindex())
            raise CliError(f"unknown interface {settings.interface!r} (this machine has: {names})",
                           ExitStatus.USAGE) from None
        if not can_attach():
            raise CliError("attaching BPF programs needs root (or CAP_BPF and CAP_NET_ADMIN): run it with sudo, "
                           "or add -n to serve from user space only", ExitStatus.NO_PERMISSION)
        if not interface_up(settings.interface):  # attached all the same: it works once up
            log.warning("warning: interface %s is down: no client reaches the server through it until "
                        "it is up (ip link set %s up)", settings.interface, settings.interface)
    elif settings.deny or settings.syn_rate:
        raise CliError("--deny and --syn-rate are enforced by the XDP program: drop -n", ExitStatus.USAGE)
    if settings.access_log is not None:
        _check_access_log(Path(settings.access_log))
    if settings.metrics:
        from .metrics import MetricsAddressError, parse_addr

        try:
            _, metrics_port = parse_addr(settings.metrics)
        except MetricsAddressError as exc:
            raise CliError(str(exc), ExitStatus.USAGE) from None
        if metrics_port == 0:  # fine for tests of the module; a user would not learn the port
            raise CliError(f"invalid metrics address {settings.metrics!r}: expected a port 1-65535",
                           ExitStatus.USAGE)
        if metrics_port == settings.port:
            raise CliError(f"invalid metrics address {settings.metrics!r}: port {metrics_port} is the file "
                           "server's own; choose another", ExitStatus.USAGE)
    try:
        taken = port_in_use(settings.port, settings.host)
    except PermissionError:
        start = _sysctl_int("net/ipv4/ip_unprivileged_port_start", 1024)
        raise CliError(f"port {settings.port} is privileged (below {start}): run it with sudo or choose "
                       f"a port from {start}", ExitStatus.NO_PERMISSION) from None
    if taken:
        pid = running_pid(settings.port)
        owner = f" by a file server (pid {pid}); stop it with: fsctl down -p {settings.port}" if pid else ""
        raise CliError(f"port {settings.port} is already in use{owner}", ExitStatus.PORT_IN_USE)


def _check_access_log(path: Path) -> None:
    """Open the log as the workers will, now: a wrong path is one line here, not workers dying
    one after the other; O_NONBLOCK, so that a FIFO nobody reads fails instead of blocking."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        reason = "no process reads that FIFO" if exc.errno == errno.ENXIO else exc.strerror
        raise CliError(f"cannot write the access log {shown(path)}: {reason}", ExitStatus.USAGE) from None
    os.close(fd)


class DateRefresher(threading.Thread):
    """Calls refresh() every second until stop(); the kernel's Date header comes from it."""

    def __init__(self, refresh: Callable[[], object]) -> None:
        super().__init__(name="date-refresh", daemon=True)
        self._refresh = refresh
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(1.0 - time.time() % 1.0):
            try:
                self._refresh()
            except Exception as exc:  # keep refreshing: a failed second is not fatal
                log.warning("Date refresh failed: %s", exc)

    def stop(self) -> None:
        self._stopped.set()
        self.join(timeout=2)


def _kernel_cache(kernel_path: Any, settings: Settings) -> Any | None:
    """fileserver_ctl.cache.KernelCache filled from the docroot, if that module is present."""
    if importlib.util.find_spec("fileserver_ctl.cache") is None:
        log.info("fileserver_ctl.cache not present: the kernel cache stays empty")
        return None
    from .cache import KernelCache, state_path
    from .tui import fmt_bytes

    cache = KernelCache(kernel_path.maps, settings, tracepoints=kernel_path.coherence_tracepoints,
                        state_file=state_path(settings.port))
    if settings.verbose:
        out(f"Cache coherence: {cache.coherence}")
    if settings.cache_size > cache.capacity:
        out(f"Cache size {fmt_bytes(settings.cache_size)} is more than the kernel maps hold: "
            f"the budget is {fmt_bytes(cache.capacity)}")
    if not settings.logs_requests:  # else the access log reads the events and passes them on
        cache.watch_events()
    cache.refresh_date()
    count = cache.fill(Path(settings.docroot))
    out(f"Kernel cache: {count} file{'' if count == 1 else 's'} from {display_path(Path(settings.docroot))}"
        f" ({fmt_bytes(cache.policy.used)} of kernel memory, budget {fmt_bytes(cache.policy.budget)})")
    cache.publish()
    return cache


def _on_served(cache: Any) -> Callable[[str, os.stat_result], None] | None:
    if cache is None:
        return None

    def admit(rel_path: str, st: os.stat_result) -> None:
        try:
            cache.add(rel_path)
        except Exception as exc:  # a file the cache cannot take is still served from user space
            log.debug("kernel cache: %s not added: %s", rel_path, exc)

    return admit


def _log_kernel_responses(stack: ExitStack, kernel_path: Any, settings: Settings, cache: Any) -> None:
    """Write the kernel path's answers (its `events` ring buffer) into the access log; the
    cache counts its misses from the same records."""
    from .access_log import AccessLog, KernelEventLog
    from .libbpf import Abi, RingBuffer

    access_log = AccessLog(settings.access_log or "-", buffer_lines=256)
    stack.callback(access_log.close)
    events = KernelEventLog(lambda cb: RingBuffer(kernel_path.maps["events"], cache.tap(cb) if cache else cb),
                            Abi(config.ABI_HEADER), access_log)
    stop = threading.Event()
    thread = threading.Thread(target=events.run, args=(stop,), name="kernel-access-log", daemon=True)
    thread.start()

    def finish() -> None:
        stop.set()
        thread.join(timeout=2)
        events.close()

    stack.callback(finish)


def _report_policy(kernel_path: Any, settings: Settings) -> None:
    """Say what --deny and --syn-rate enforce (KernelPath wrote them before attaching); without
    XDP they would not hold, so that is an error."""
    att = kernel_path.attachment
    if not att.xdp_mode:
        raise CliError(f"--deny and --syn-rate need the XDP program, which is not attached to "
                       f"{att.interface}: {att.xdp_problem}")
    denied = kernel_path.denied
    if denied:
        out(f"Deny list: {', '.join(map(str, denied))}")
    if settings.syn_rate:
        out(f"SYN rate limit: {settings.syn_rate} new connection{'' if settings.syn_rate == 1 else 's'} "
            "per second per client")


def _listen(settings: Settings) -> list:
    """The server's listening sockets, made ahead of serve() (see cmd_up)."""
    from .server import listen_sockets, worker_count

    return listen_sockets(settings.host, settings.port, worker_count(settings))


def _serve(settings: Settings, on_ready: Callable[[], None], on_served: Any, socks: list | None) -> int:
    if importlib.util.find_spec("fileserver_ctl.server") is None:
        return _standin_serve(settings, on_ready)
    from .server import serve

    return serve(settings, on_ready=on_ready, on_served=on_served, socks=socks)


def _standin_serve(settings: Settings, on_ready: Callable[[], None]) -> int:
    """A plain aiohttp static server, used only while fileserver_ctl.server is absent."""
    import asyncio

    from aiohttp import web

    async def main() -> None:
        app = web.Application()
        root = Path(settings.docroot).resolve()

        async def index(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(root / "index.html")

        app.router.add_get("/", index)
        app.router.add_static("/", root, show_index=settings.autoindex)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await web.TCPSite(runner, settings.host or None, settings.port).start()
            on_ready()
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
    return ExitStatus.SUCCESS


def cmd_up(settings: Settings) -> int:
    global _attached_port
    _validate_up(settings)
    out(f"Document root: {display_path(Path(settings.docroot))}")
    out(f"Kernel caching: {'enabled' if settings.kernel_cache else 'disabled'}")
    with ExitStack() as stack:
        stack.enter_context(pid_file(settings.port))
        cache = None
        socks = None
        if settings.kernel_cache:
            # Listen before attaching, close after detaching: the TC program answers SYNs itself
            # and hands every request it cannot answer to this listener; with none, a reset.
            socks = _listen(settings)
            for sock in socks:
                stack.callback(sock.close)
            from .kernel import KernelPath
            from .policy import PolicyMapsMissing

            try:
                _attached_port = settings.port
                kernel_path = stack.enter_context(KernelPath(settings))
            except PolicyMapsMissing as exc:
                raise CliError(str(exc)) from None
            att = kernel_path.attachment
            out(f"Successfully attached TC program to {att.interface}")
            if att.xdp_mode:
                out(f"Successfully attached XDP program to {att.interface} ({att.xdp_mode} mode)")
            else:
                out(f"XDP program not attached to {att.interface}: {att.xdp_problem}")
            stack.callback(out, f"Detached kernel programs from {att.interface}")
            if settings.deny or settings.syn_rate:
                _report_policy(kernel_path, settings)
            cache = _kernel_cache(kernel_path, settings)
            if cache is not None:
                stack.callback(cache.close)
                refresher = DateRefresher(cache.refresh_date)
                refresher.start()
                stack.callback(refresher.stop)
            if settings.logs_requests:
                _log_kernel_responses(stack, kernel_path, settings, cache)
        if settings.metrics:
            from .metrics import start_metrics

            metrics = start_metrics(settings.metrics, settings.port)
            stack.callback(metrics.close)
            out(f"Metrics at http://{settings.metrics}/metrics")
        os.register_at_fork(after_in_child=_after_fork_in_worker)
        status = _serve(settings, lambda: out(f"File server listening on port {settings.port}"),
                        _on_served(cache), socks)
    return int(status)


# ---------------------------------------------------------------------------------------------
# fsctl down, stats, top


def _wait_gone(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(port) is None:
            return True
        time.sleep(0.05)
    return running_pid(port) is None


def _remove_stale_userstats(port: int) -> str | None:
    """The user-space counters file a crashed server left (its pid no longer runs)."""
    from .userstats import UserStats, stats_path

    try:
        with UserStats.open(port) as shared:
            if shared.alive():
                return None
    except FileNotFoundError:
        return None
    except ValueError:
        pass  # unreadable: stale by definition
    path = stats_path(port)
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass
    return str(path)


def cmd_down(settings: Settings) -> int:
    port = settings.port
    pid = running_pid(port)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except PermissionError:
            raise CliError(f"not allowed to stop pid {pid}: run it with sudo", ExitStatus.NO_PERMISSION) from None
        if not _wait_gone(port, STOP_TIMEOUT):
            log.warning("pid %d did not stop within %.0f s: killing it", pid, STOP_TIMEOUT)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _wait_gone(port, 2.0)
        out(f"Stopped file server on port {port} (pid {pid})")
    if running_pid(port) is None:
        pid_path(port).unlink(missing_ok=True)
    removed: list[str] = []
    if can_attach():
        from .kernel import remove_leftovers

        removed = remove_leftovers(port)
        for item in removed:
            out(f"Removed leftover: {item}")
    elif config.pin_dir(port).exists():
        raise CliError("removing kernel leftovers needs root: run it with sudo", ExitStatus.NO_PERMISSION)
    stale = _remove_stale_userstats(port)
    if stale:
        out(f"Removed leftover: {stale}")
        removed.append(stale)
    if pid is None and not removed:
        out(f"No file server running on port {port}; nothing left behind")
    return ExitStatus.SUCCESS


def cmd_stats(port: int, as_json: bool) -> int:
    from . import stats

    try:
        snap = stats.read_snapshot(port)
    except stats.NoServerError as exc:
        raise CliError(str(exc), ExitStatus.NO_SERVER) from None
    figures = stats.to_json(snap)
    if as_json:
        out(json.dumps(figures, indent=2))
        return ExitStatus.SUCCESS
    width = max(len(k) for k in figures)
    for name, value in figures.items():
        if isinstance(value, dict | list):
            value = json.dumps(value)
        out(f"{name:<{width}}  {value}")
    return ExitStatus.SUCCESS


def cmd_deny(port: int, network: Any, *, allow: bool) -> int:
    """fsctl deny / allow: change a running server's deny list, or list it (deny without CIDR)."""
    from . import policy

    if running_pid(port) is None:
        raise CliError(f"no file server running on port {port}", ExitStatus.NO_SERVER)
    if not can_attach():
        raise CliError("changing the deny list needs root: run it with sudo", ExitStatus.NO_PERMISSION)
    try:
        with policy.DenyList.pinned(port) as deny_list:
            unenforced = _deny_list_unenforced(port)
            if network is None:
                entries = deny_list.entries()
                if not entries:
                    out(f"Deny list of port {port} is empty")
                width = max((len(e.network) for e in entries), default=0)
                for e in entries:
                    out(f"{e.network:<{width}}  {e.drops} dropped")
                if unenforced:
                    log.warning("warning: the deny list of port %d is not enforced: %s", port, unenforced)
            elif allow:
                if not deny_list.remove(network):
                    raise CliError(f"{network} is not in the deny list of port {port} (list it: fsctl deny -p {port})")
                out(f"Allowed {network} on port {port}")
            elif unenforced:
                raise CliError(f"{network} not denied: the deny list of port {port} is not enforced, {unenforced}")
            elif deny_list.add(network):
                out(f"Denied {network} on port {port}")
                if network.prefixlen == 0:
                    log.warning("warning: %s drops every IPv%d client of port %d (fsctl allow %s takes it back)",
                                network, network.version, port, network)
            else:
                out(f"{network} was already denied on port {port}")
    except policy.PolicyMapsMissing as exc:
        raise CliError(f"{exc}: that server runs without the XDP policy (-n, or an older BPF object)") from None
    return ExitStatus.SUCCESS


def _deny_list_unenforced(port: int) -> str | None:
    """Why nothing drops what the deny list of `port` holds (the server's XDP program is not
    attached: another one held the interface at its start), or None when it is enforced."""
    from . import kernel, libbpf
    from .policy import DENY_MAPS

    state = kernel.run_state(port)
    if state is None or not state.ifindex:
        return None  # no record of where it runs: nothing to say
    ifindex, interface = state.ifindex, state.interface
    holder = libbpf.xdp_query(ifindex).prog_id
    if not holder:
        return f"no XDP program is attached to {interface}"
    with libbpf.Map.from_pin(config.pin_dir(port) / DENY_MAPS[4][0]) as deny_map:
        ours = deny_map.id
    info = libbpf.prog_info(holder)
    if ours in info.map_ids:
        return None
    return f"{interface} runs another XDP program ({info.name}, id {holder}; see: bpftool net)"


def cmd_top(port: int, once: bool) -> int:
    from . import stats, tui

    try:
        return tui.run_top(port, once=once)
    except stats.NoServerError as exc:
        raise CliError(str(exc), ExitStatus.NO_SERVER) from None


# ---------------------------------------------------------------------------------------------
# The one place where exceptions become messages and exit codes


def _configure_logging(verbosity: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fsctl: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity else logging.WARNING)
    # libbpf's warnings are quoted in the errors that matter; alone they are noise (probes), and
    # its debug output (every relocation) is only for -vv.
    logging.getLogger("fileserver.libbpf").setLevel(logging.DEBUG if verbosity > 1 else logging.CRITICAL)


def _os_error_status(exc: OSError) -> ExitStatus:
    if exc.errno == errno.EADDRINUSE:
        return ExitStatus.PORT_IN_USE
    if exc.errno in (errno.EPERM, errno.EACCES):
        return ExitStatus.NO_PERMISSION
    if exc.errno == errno.EBUSY:
        return ExitStatus.PORT_IN_USE
    return ExitStatus.ERROR


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(getattr(args, "verbose", 0) or 0)
    settings = settings_from_args(args)
    if args.command == "up":
        return cmd_up(settings)
    if args.command == "down":
        return cmd_down(settings)
    if args.command == "stats":
        return cmd_stats(settings.port, args.json)
    if args.command == "top":
        return cmd_top(settings.port, args.once)
    if args.command in ("deny", "allow"):
        return cmd_deny(settings.port, args.cidr, allow=args.command == "allow")
    from .doctor import run_doctor

    return run_doctor()


# The port `fsctl up` began attaching for: main() sweeps it once everything has unwound.
_attached_port: int | None = None


def _sweep_own_leftovers() -> None:
    """Backstop for a signal that lands between two steps of a start or of its unwinding (Python
    raises it at any bytecode, say between KernelPath.__enter__ and the ExitStack taking its
    __exit__): whatever of this port's run is left goes, as the next start would remove it."""
    global _attached_port
    port, _attached_port = _attached_port, None
    if port is None:
        return
    try:
        from .kernel import remove_leftovers

        for what in remove_leftovers(port):
            log.info("removed after an interrupted run: %s", what)
    except (Exception, KeyboardInterrupt, Terminated) as exc:
        # another server took the port meanwhile, a second signal, or an import the first one
        # cut short: a backstop must not fail the exit; the next start sweeps
        log.debug("sweep of port %d after the run: %s: %s", port, type(exc).__name__, exc)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    verbose = any(a == "--verbose" or re.fullmatch(r"-v+", a) for a in argv)
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return run(argv)
    except CliError as exc:
        print(f"fsctl: error: {exc}", file=sys.stderr)
        return exc.status
    except BrokenPipeError:
        # the reader went away (`| head`): quiet, as other tools are; a server says why it stopped
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        if argv[:1] == ["up"]:
            print("fsctl: error: standard output was closed (broken pipe): server stopped", file=sys.stderr)
        return ExitStatus.BROKEN_PIPE
    except OSError as exc:
        message = exc.strerror if exc.strerror and not exc.filename else str(exc)
        print(f"fsctl: error: {message.splitlines()[0] if not verbose else message}", file=sys.stderr)
        return _os_error_status(exc)
    except (KeyboardInterrupt, Terminated):
        print("fsctl: interrupted", file=sys.stderr)
        return ExitStatus.INTERRUPTED
    except SystemExit:
        raise  # --help and --version
    except Exception as exc:
        if verbose:
            traceback.print_exc()
        print(f"fsctl: internal error: {type(exc).__name__}: {exc} (run with -v for details)", file=sys.stderr)
        return ExitStatus.ERROR
    finally:
        _sweep_own_leftovers()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
