"""The user-space file server: worker processes on one port, supervised by the calling process.

`serve(settings)` binds one SO_REUSEPORT listening socket per worker (so the kernel spreads new
connections over them), forks the workers, and supervises them: a worker that dies is forked
again on the same socket (its queued connections survive), SIGINT/SIGTERM are forwarded, and the
exit status is returned. Each worker runs an asyncio (uvloop) loop with one HttpConnection per
connection (http_protocol.py).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from .config import TIMEOUTS, Settings, env_seconds
from .http_files import FileStore
from .access_log import AccessLog
from .http_answer import OnServed
from .http_protocol import Worker
from .readiness import readable as wait_readable
from .userstats import UserStats

BACKLOG = 4096
PR_SET_PDEATHSIG = 1
STOP_GRACE = 5.0  # seconds workers get to exit after SIGTERM before SIGKILL
CRASH_WINDOW = 2.0  # a worker that dies this soon after its start counts as a crash...
CRASH_LIMIT = 5  # ...and this many in a row end serve() with status 1
LOG_BUFFER_LINES = 256  # access-log lines a worker keeps before writing (flushed every second too)
KEEPALIVE_TIMEOUT = env_seconds("FILESERVER_KEEPALIVE_TIMEOUT", TIMEOUTS["FILESERVER_KEEPALIVE_TIMEOUT"])


def serve(settings: Settings, *, on_ready: Callable[[], None] | None = None,
          on_served: OnServed | None = None, socks: list[socket.socket] | None = None) -> int:
    """Serve settings.docroot on settings.port until SIGINT/SIGTERM; returns the exit status.

    `socks`: listening sockets the caller made with listen_sockets() and closes itself; by
    default serve() makes them. Raises OSError(EADDRINUSE) if the port is taken,
    OSError(ENOENT/ENOTDIR) for a bad docroot. Must run in the main thread (it handles signals).
    """
    docroot = Path(settings.docroot)
    if not docroot.is_dir():
        raise OSError(errno.ENOTDIR if docroot.exists() else errno.ENOENT,
                      f"docroot {docroot} is not a directory")
    own = socks is None
    if socks is None:
        socks = listen_sockets(settings.host, settings.port, worker_count(settings))
    try:
        stats = UserStats.create(settings.port, len(socks))
    except OSError:
        stats = None  # counters are optional: not being root must not stop the server
    try:
        return _supervise(settings, socks, stats, on_ready, on_served)
    finally:
        if own:
            for s in socks:
                s.close()
        if stats is not None:
            stats.close()


def worker_count(settings: Settings) -> int:
    """Worker processes, one listening socket each: settings.workers, else one per CPU."""
    return settings.workers if settings.workers and settings.workers > 0 else os.cpu_count() or 1


# -- sockets ---------------------------------------------------------------------------------

def _address(host: str, port: int) -> tuple[socket.AddressFamily, tuple]:
    if not host:
        if socket.has_ipv6:
            try:
                with socket.socket(socket.AF_INET6, socket.SOCK_STREAM):
                    return socket.AF_INET6, ("::", port)
            except OSError:
                pass
        return socket.AF_INET, ("0.0.0.0", port)
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)[0]
    return family, addr


def _socket(family: socket.AddressFamily, reuseport: bool) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 too, as ::ffff:a.b.c.d
    return s


def listen_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """`count` listening sockets in one SO_REUSEPORT group; EADDRINUSE if anyone else has the port.

    Another SO_REUSEPORT process of the same user could silently join the group, so a probe
    without SO_REUSEPORT checks first that the port is free.
    """
    family, addr = _address(host, port)
    probe = _socket(family, reuseport=False)
    try:
        probe.bind(addr)
    except OSError as exc:
        probe.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(errno.EADDRINUSE, f"port {port} is already in use") from None
        raise
    probe.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = _socket(family, reuseport=True)
            socks.append(s)
            s.bind(addr)
            s.listen(BACKLOG)
            s.setblocking(False)
    except OSError as exc:
        for s in socks:
            s.close()
        if exc.errno == errno.EMFILE:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            raise OSError(errno.EMFILE, f"{count} workers need {count} listening sockets, more than the "
                          f"open-file limit allows ({soft}): use fewer --workers or raise ulimit -n") from None
        raise
    return socks


# -- the supervising parent ------------------------------------------------------------------

def _supervise(settings: Settings, socks: list[socket.socket], stats: UserStats | None,
               on_ready: Callable[[], None] | None, on_served: OnServed | None) -> int:
    stop: list[int] = []
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    old_handlers = {sig: signal.signal(sig, _handler(stop, sig))
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    pids: dict[int, tuple[int, float]] = {}  # pid -> (socket index, start time)
    status = 0
    try:
        for index in range(len(socks)):
            pids[_fork_worker(settings, socks, stats, index, ready_w, (wake_r, wake_w, ready_r),
                              on_served)] = (index, time.monotonic())
        announced = False
        ready = 0
        crashes = 0
        while not stop:
            readable = wait_readable([wake_r, ready_r], 1.0)
            if wake_r in readable:
                _drain(wake_r)
            if ready_r in readable:
                ready += len(os.read(ready_r, 4096))
                if not announced and ready >= len(socks):
                    announced = True
                    if on_ready is not None:
                        on_ready()
            for pid, (index, started) in list(pids.items()):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
                del pids[pid]
                if stop:
                    break
                crashes = crashes + 1 if time.monotonic() - started < CRASH_WINDOW else 0
                if crashes >= CRASH_LIMIT:
                    print("fileserver: workers keep dying; stopping", file=sys.stderr)
                    status = 1
                    stop.append(0)
                    break
                new = _fork_worker(settings, socks, stats, index, ready_w, (wake_r, wake_w, ready_r),
                                   on_served)
                pids[new] = (index, time.monotonic())
    finally:
        _stop_workers(pids)
        signal.set_wakeup_fd(old_wakeup)
        for sig, old in old_handlers.items():
            signal.signal(sig, old)
        for fd in (wake_r, wake_w, ready_r, ready_w):
            os.close(fd)
    return status


def _handler(stop: list[int], sig: int):
    def handle(signum, frame) -> None:
        if signum != signal.SIGCHLD:
            stop.append(signum)
    return handle


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _stop_workers(pids: dict[int, tuple[int, float]]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE
    left = set(pids)
    while left:
        for pid in list(left):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                left.discard(pid)
        if not left:
            break
        if time.monotonic() > deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            break
        time.sleep(0.02)


def _fork_worker(settings: Settings, socks: list[socket.socket], stats: UserStats | None,
                 index: int, ready_w: int,
                 parent_fds: tuple[int, ...], on_served: OnServed | None) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        _die_with_parent()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for fd in parent_fds:
            os.close(fd)
        for i, s in enumerate(socks):
            if i != index:
                s.close()
        code = run_worker(settings, socks[index], ready_w, on_served,
                          stats.slot(index) if stats is not None else None)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _die_with_parent() -> None:
    """SIGTERM this worker when the supervisor dies, even by SIGKILL, so no orphan keeps the port."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


# -- one worker ------------------------------------------------------------------------------

def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_worker(settings: Settings, sock: socket.socket, ready_w: int,
               on_served: OnServed | None, stats=None) -> int:
    """Serve on `sock` until SIGTERM/SIGINT; writes one byte to `ready_w` once accepting."""
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_worker_main(settings, sock, ready_w, on_served, stats))
    finally:
        loop.close()


async def _worker_main(settings: Settings, sock: socket.socket, ready_w: int,
                       on_served: OnServed | None, stats) -> int:
    loop = asyncio.get_running_loop()
    log = None
    if settings.access_log is not None:
        log = AccessLog(settings.access_log, buffer_lines=LOG_BUFFER_LINES)
    elif settings.verbose:
        log = AccessLog("-", buffer_lines=LOG_BUFFER_LINES)
    worker = Worker(FileStore(Path(settings.docroot), autoindex=settings.autoindex),
                    log=log, stats=stats, on_served=on_served,
                    keepalive_timeout=KEEPALIVE_TIMEOUT)
    server = await loop.create_server(worker.protocol, sock=sock, backlog=BACKLOG)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)

    def tick() -> None:
        worker.clock()
        loop.call_later(1.0 - time.time() % 1.0 + 0.0005, tick)

    loop.call_later(1.0 - time.time() % 1.0 + 0.0005, tick)
    gc.freeze()  # what exists now lives as long as the worker: keep it out of every collection
    os.write(ready_w, b"r")
    os.close(ready_w)
    await stopped.wait()
    server.close()
    for conn in list(worker.conns):
        if conn.transport is not None:
            conn.transport.abort()
    if log is not None:
        log.close()
    return 0
