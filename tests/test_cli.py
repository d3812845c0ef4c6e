"""The real `.venv/bin/fsctl` as a user runs it: messages, exit codes, clean detach, crash recovery."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver_ctl import config, kernel, libbpf
from fileserver_ctl.cli import ExitStatus, parse_size, pid_path
from fileserver_ctl.libbpf import Abi

REPO = Path(__file__).resolve().parent.parent
FSCTL = REPO / ".venv" / "bin" / "fsctl"
READY_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(not FSCTL.exists(), reason=f"{FSCTL} not installed (run: make setup)")


def fsctl(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
          timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, str(FSCTL), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def assert_one_line_error(result: subprocess.CompletedProcess, status: ExitStatus, words: str) -> None:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fsctl: error: "), result.stderr
    assert words in lines[0]


class Server:
    """`fsctl up` in the background; its stdout lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([str(FSCTL), "up", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=REPO)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float = READY_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if line.startswith(prefix):
                return line
        self.proc.kill()
        raise AssertionError(f"no {prefix!r} line; got {self.lines}; stderr: {self.proc.communicate(timeout=10)[1]}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        self.stderr = self.proc.stderr.read()  # type: ignore[union-attr]
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def end(self) -> None:
        """After a test, failed ones too: as Ctrl-C would, so that nothing stays attached."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture
def docroot(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    (root / "index.html").write_text("<!doctype html><title>t</title>hello\n")
    (root / "a.txt").write_text("alpha\n")
    return root


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        server.end()


def get(port: int, path: str = "/") -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.status, response.read()


def assert_detached(port: int) -> None:
    assert libbpf.tc_query(1, kernel.tc_handle(port), kernel.TC_PRIORITY) is None
    shown = subprocess.run(["tc", "filter", "show", "dev", "lo", "ingress"], capture_output=True, text=True).stdout
    assert f"handle {kernel.tc_handle(port):#x} " not in shown
    assert not config.pin_dir(port).exists()
    assert not kernel.state_path(port).exists()
    assert not pid_path(port).exists()


# --- errors: one line, the right exit status, nothing attached ---------------------------------


def test_bad_flag() -> None:
    assert_one_line_error(fsctl("up", "--bogus"), ExitStatus.USAGE, "--bogus")
    assert_one_line_error(fsctl("up", "-p", "0"), ExitStatus.USAGE, "invalid port")
    assert_one_line_error(fsctl("up", "--workers", "0"), ExitStatus.USAGE, "invalid count")
    assert_one_line_error(fsctl("up", "--cache-size", "lots"), ExitStatus.USAGE, "invalid size")
    assert_one_line_error(fsctl(), ExitStatus.USAGE, "required")


def test_missing_docroot(tmp_path: Path, free_port: int) -> None:
    result = fsctl("up", "-p", str(free_port), "-d", str(tmp_path / "absent"))
    assert_one_line_error(result, ExitStatus.USAGE, "does not exist")
    (tmp_path / "file").write_text("x")
    assert_one_line_error(fsctl("up", "-p", str(free_port), "-d", str(tmp_path / "file")), ExitStatus.USAGE,
                          "not a directory")


@pytest.mark.parametrize("value", ["abc", "70000", "-1", ""])
def test_bad_fileserver_port(value: str, docroot: Path) -> None:
    result = fsctl("up", "-d", str(docroot), env={"FILESERVER_PORT": value})
    assert_one_line_error(result, ExitStatus.USAGE, "FILESERVER_PORT")


@pytest.mark.parametrize("value", ["maybe", "2", "enabled", ""])
def test_bad_fileserver_kernel_processing(value: str, docroot: Path) -> None:
    result = fsctl("up", "-d", str(docroot), env={"FILESERVER_KERNEL_PROCESSING": value})
    assert_one_line_error(result, ExitStatus.USAGE, "FILESERVER_KERNEL_PROCESSING")


@pytest.mark.parametrize(("value", "enabled"), [("0", False), ("off", False), ("No", False),
                                                (" 1 ", True), ("true", True), ("ON", True)])
def test_fileserver_kernel_processing_values(value: str, enabled: bool, monkeypatch) -> None:
    from fileserver_ctl.config import Settings

    monkeypatch.setenv("FILESERVER_KERNEL_PROCESSING", value)
    assert Settings.from_env().kernel_cache is enabled


def test_unknown_interface(docroot: Path, free_port: int) -> None:
    result = fsctl("up", "-i", "nosuchif0", "-p", str(free_port), "-d", str(docroot))
    assert_one_line_error(result, ExitStatus.USAGE, "unknown interface 'nosuchif0'")


@pytest.mark.bpf
def test_port_in_use(docroot: Path, free_port: int) -> None:
    with socket.create_server(("127.0.0.1", free_port)):
        result = fsctl("up", "-p", str(free_port), "-d", str(docroot))
    assert_one_line_error(result, ExitStatus.PORT_IN_USE, f"port {free_port} is already in use")
    assert_detached(free_port)


def test_not_root(free_port: int) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run fsctl as nobody")
    nobody = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups")
    result = fsctl("up", "-p", str(free_port), "-d", str(REPO / "www"), prefix=nobody)
    assert_one_line_error(result, ExitStatus.NO_PERMISSION, "needs root")
    doctor = fsctl("doctor", prefix=nobody)
    assert doctor.returncode == ExitStatus.CHECK_FAILED and "Traceback" not in doctor.stderr
    failed = [line for line in doctor.stdout.splitlines() if line.startswith("FAIL")]
    assert failed and all(" — " in line for line in failed)  # each says what to do
    assert any("privileges" in line for line in failed)


def test_stats_and_down_without_server(free_port: int) -> None:
    assert_one_line_error(fsctl("stats", "-p", str(free_port)), ExitStatus.NO_SERVER, "no file server")
    result = fsctl("down", "-p", str(free_port))
    assert result.returncode == 0 and "nothing left behind" in result.stdout


def test_parse_size() -> None:
    assert parse_size("64M") == 64 << 20 and parse_size("512k") == 512 << 10
    assert parse_size("1GiB") == 1 << 30 and parse_size("1000") == 1000


@pytest.mark.parametrize(("flag", "value", "words"), [
    ("-p", "\u0663", "invalid port"),  # ARABIC-INDIC DIGIT THREE: str.isdigit() says yes
    ("-p", "\u00b2", "invalid port"),  # SUPERSCRIPT TWO: isdigit() yes, int() no
    ("--workers", "\u0663", "invalid count"),
    ("--workers", "257", "expected 1-256 worker processes"),  # 5000 forked until the OOM killer came
    ("--syn-rate", "\u0663", "invalid rate"),
    ("--cache-size", "\u0663M", "invalid size"),
    ("-d", "", "invalid document root"),  # Path("") would be ".": the current directory
    ("--access-log", "", "invalid access log"),
    ("--access-log", "/nonexistent/dir/access.log", "cannot write the access log"),
    ("--access-log", "{tmp}", "cannot write the access log"),  # a directory
    ("--access-log", "{tmp}/fifo", "no process reads that FIFO"),  # would block the workers
    ("--metrics", "127.0.0.1:0", "invalid metrics address"),  # a random port nobody is told
    ("--metrics", "127.0.0.1:\u0663", "invalid metrics address"),
    ("--metrics", "127.0.0.1:{port}", "is the file server's own"),
])
def test_odd_flag_values_are_refused(flag: str, value: str, words: str, docroot: Path,
                                     free_port: int, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    value = value.replace("{tmp}", str(tmp_path))
    args = ["-d", str(docroot)] if flag != "-d" else []
    args += ["-p", str(free_port)] if flag != "-p" else []
    value = value.replace("{port}", str(free_port))
    assert_one_line_error(fsctl("up", "-n", *args, flag, value, timeout=10), ExitStatus.USAGE, words)


@pytest.mark.parametrize(("name", "value"), [
    ("FILESERVER_DOCROOT", ""),  # would serve the current directory
    ("FILESERVER_DOCROOT", "/nonexistent/a\nb"),  # the message stays one line
    ("FILESERVER_PORT", "\u0663"), ("FILESERVER_PORT", " 80"), ("FILESERVER_PORT", "8_0"),
    ("FILESERVER_KEEPALIVE_TIMEOUT", "abc"), ("FILESERVER_KEEPALIVE_TIMEOUT", "-1"),
    ("FILESERVER_KEEPALIVE_TIMEOUT", "nan"), ("FILESERVER_HEADER_TIMEOUT", "inf"),
    ("FILESERVER_HEADER_TIMEOUT", "30s"),
])
def test_odd_environment_values_are_refused(name: str, value: str, docroot: Path, free_port: int) -> None:
    env = {"FILESERVER_DOCROOT": str(docroot), "FILESERVER_PORT": str(free_port), name: value}
    words = "document root '/nonexistent/a\\nb' does not exist" if "\n" in value else name
    assert_one_line_error(fsctl("up", "-n", env=env, timeout=10), ExitStatus.USAGE, words)


def test_timeouts_default_to_nginx_s() -> None:
    """Unset, the keep-alive and header timeouts are nginx's defaults (keepalive_timeout 75s,
    client_header_timeout 60s), as the server processes read them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FILESERVER_")}
    code = ("from fileserver_ctl import http_protocol, server; "
            "print(server.KEEPALIVE_TIMEOUT, http_protocol.HEADER_TIMEOUT, "
            "http_protocol.Worker(None).keepalive_timeout)")
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    assert out.split() == ["75.0", "60.0", "75.0"]


# --- the lifecycle a user sees ------------------------------------------------------------------


@pytest.mark.bpf
def test_up_serves_reports_and_detaches_on_sigint(docroot: Path, free_port: int, servers: list[Server]) -> None:
    server = Server("-p", str(free_port), "-d", str(docroot), "--workers", "1")
    servers.append(server)
    server.wait_for(f"File server listening on port {free_port}")
    assert server.lines[0] == f"Document root: {docroot}"
    assert server.lines[1] == "Kernel caching: enabled"
    assert "Successfully attached TC program to lo" in server.lines
    xdp = [line for line in server.lines if "XDP" in line]
    assert xdp == ["Successfully attached XDP program to lo (generic mode)"] or "already runs XDP" in xdp[0]
    assert libbpf.tc_query(1, kernel.tc_handle(free_port), kernel.TC_PRIORITY)
    assert pid_path(free_port).read_text().strip() == str(server.proc.pid)

    assert get(free_port, "/a.txt") == (200, b"alpha\n")
    assert get(free_port, "/")[0] == 200

    stats = fsctl("stats", "--json", "-p", str(free_port))
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert {"kernel_responses", "user_responses", "cached_files"} <= figures.keys()
    counters = Abi(config.ABI_HEADER).enum("fs_stat")
    assert {name.removeprefix("FS_STAT_").lower() for name in counters if name != "FS_STAT_MAX"} <= figures.keys()
    assert figures["packets"] > 0  # TC saw our requests
    plain = fsctl("stats", "-p", str(free_port))
    assert plain.returncode == 0 and "kernel_responses" in plain.stdout

    assert server.stop(signal.SIGINT) == 0, server.stderr
    assert "Traceback" not in server.stderr
    assert server.lines[-1] == "Detached kernel programs from lo"
    assert_detached(free_port)


@pytest.mark.bpf
def test_bpftool_dump_of_file_cache_shows_paths_as_text(docroot: Path, free_port: int,
                                                         servers: list[Server]) -> None:
    """What a kernel engineer types: `bpftool map dump` of the running server's file_cache reads
    the key as the request path, not as an array of byte values, with the entry's fields."""
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool is not installed")
    server = Server("-p", str(free_port), "-d", str(docroot), "--workers", "1")
    servers.append(server)
    server.wait_for(f"File server listening on port {free_port}")
    pinned = config.pin_dir(free_port) / "file_cache"
    dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", str(pinned)],
                          capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0, dump.stderr
    entries = {e["formatted"]["key"]["path"]: e["formatted"]["value"] for e in json.loads(dump.stdout)}
    assert "/a.txt" in entries and entries["/a.txt"]["body_len"] == len(b"alpha\n")
    assert entries["/a.txt"]["head_len"] > entries["/a.txt"]["date_off"] > 0


@pytest.mark.bpf
@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, ExitStatus.SUCCESS),
                                             (signal.SIGHUP, ExitStatus.INTERRUPTED)], ids=["TERM", "HUP"])
def test_signals_detach(sig: int, status: ExitStatus, docroot: Path, free_port: int,
                        servers: list[Server]) -> None:
    server = Server("-p", str(free_port), "-d", str(docroot), "--workers", "2")
    servers.append(server)
    server.wait_for("File server listening")
    assert server.stop(sig) == status, server.stderr
    assert "Traceback" not in server.stderr
    assert_detached(free_port)


@pytest.mark.bpf
def test_sigkill_then_up_starts_cleanly_and_down_stops(docroot: Path, free_port: int,
                                                       servers: list[Server]) -> None:
    first = Server("-p", str(free_port), "-d", str(docroot), "--workers", "2")
    servers.append(first)
    first.wait_for("File server listening")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    assert libbpf.tc_query(1, kernel.tc_handle(free_port), kernel.TC_PRIORITY)  # the crash left it

    second = Server("-p", str(free_port), "-d", str(docroot), "--workers", "2")
    servers.append(second)
    second.wait_for("File server listening")  # workers of the first died with it: the port is free
    assert get(free_port, "/a.txt") == (200, b"alpha\n")

    again = fsctl("up", "-p", str(free_port), "-d", str(docroot))
    assert_one_line_error(again, ExitStatus.PORT_IN_USE, f"pid {second.proc.pid}")

    down = fsctl("down", "-p", str(free_port))
    assert down.returncode == 0, down.stderr
    assert f"Stopped file server on port {free_port} (pid {second.proc.pid})" in down.stdout
    assert second.proc.wait(timeout=10) == 0
    assert_detached(free_port)


@pytest.mark.bpf
def test_down_removes_what_a_crash_left(docroot: Path, free_port: int, servers: list[Server]) -> None:
    server = Server("-p", str(free_port), "-d", str(docroot), "--workers", "1")
    servers.append(server)
    server.wait_for("File server listening")
    server.kill()
    down = fsctl("down", "-p", str(free_port))
    assert down.returncode == 0, down.stderr
    assert "Removed leftover: TC filter on lo" in down.stdout
    assert f"Removed leftover: /run/fileserver/{free_port}/userstats" in down.stdout
    assert_detached(free_port)
    assert not Path(f"/run/fileserver/{free_port}").exists()


def test_no_kernel_cache_attaches_nothing(docroot: Path, free_port: int, servers: list[Server]) -> None:
    server = Server("-n", "-p", str(free_port), "-d", str(docroot), "--workers", "1")
    servers.append(server)
    server.wait_for("File server listening")
    assert server.lines[:2] == [f"Document root: {docroot}", "Kernel caching: disabled"]
    assert not any("attached" in line for line in server.lines)
    assert not config.pin_dir(free_port).exists()
    assert get(free_port, "/a.txt") == (200, b"alpha\n")
    assert server.stop(signal.SIGTERM) == 0
    assert not pid_path(free_port).exists()


@pytest.mark.bpf
def test_doctor_passes_here() -> None:
    result = fsctl("doctor")
    assert result.returncode == 0, result.stdout
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "All essential checks passed"
    assert all(line.split()[0] in ("ok", "warn") for line in lines[:-1])
    names = {line.split()[1].rstrip(":") for line in lines[:-1]}
    assert {"kernel", "BTF", "privileges", "bpffs", "libbpf", "clang", "clsact", "fentry", "tcp_syncookies"} <= names


def test_module_entry_point_is_fsctl() -> None:
    result = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "fileserver_ctl", "--version"],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0 and result.stdout.startswith("fsctl ")


def test_date_refresher_ticks_each_second_and_survives_errors() -> None:
    from fileserver_ctl.cli import DateRefresher

    calls: list[float] = []

    def refresh() -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("one bad second")

    refresher = DateRefresher(refresh)
    refresher.start()
    deadline = time.monotonic() + 3.5
    while len(calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    refresher.stop()
    assert len(calls) >= 2 and 0.5 < calls[1] - calls[0] < 1.5
    assert not refresher.is_alive()


@pytest.mark.bpf
def test_access_log_marks_the_path_that_answered(docroot: Path, free_port: int, tmp_path: Path,
                                                 servers: list[Server]) -> None:
    log_file = tmp_path / "access.log"
    server = Server("-p", str(free_port), "-d", str(docroot), "--workers", "1", "--access-log", str(log_file))
    servers.append(server)
    server.wait_for(f"File server listening on port {free_port}")
    assert get(free_port, "/a.txt") == (200, b"alpha\n")  # cached at start: the kernel answers
    with pytest.raises(urllib.error.HTTPError) as missing:
        get(free_port, "/missing.txt")
    assert missing.value.code == 404
    assert server.stop(signal.SIGINT) == 0, server.stderr
    lines = log_file.read_text().splitlines()
    kernel_lines = [line for line in lines if '"GET /a.txt HTTP/1.1" 200 6 ' in line]
    user_lines = [line for line in lines if '"GET /missing.txt HTTP/1.1" 404 ' in line]
    assert kernel_lines and kernel_lines[0].endswith('"kernel"'), lines
    assert user_lines and user_lines[0].endswith('"user"'), lines
    assert "libbpf" not in server.stderr  # libbpf's debug output only with -vv


@pytest.mark.bpf
def test_deny_refused_when_nothing_enforces_it(docroot: Path, servers: list[Server]) -> None:
    """One XDP program per device: of two servers on lo at most the first gets it, and the
    second's `fsctl deny` must not say "Denied" for a list nothing reads."""
    from servers import pick_port

    ports = [pick_port(), pick_port()]
    for port in ports:
        server = Server("-p", str(port), "-d", str(docroot), "--workers", "1")
        servers.append(server)
        server.wait_for("File server listening")
    first, second = servers
    result = fsctl("deny", "-p", str(ports[1]), "203.0.113.0/24")
    assert_one_line_error(result, ExitStatus.ERROR, f"the deny list of port {ports[1]} is not enforced")
    listed = fsctl("deny", "-p", str(ports[1]))
    assert listed.returncode == 0 and "Deny list of port" in listed.stdout
    assert "is not enforced" in listed.stderr and "Traceback" not in listed.stderr
    assert fsctl("allow", "-p", str(ports[1]), "203.0.113.0/24").returncode == 1  # never added
    if "Successfully attached XDP program to lo (generic mode)" in first.lines:
        done = fsctl("deny", "-p", str(ports[0]), "203.0.113.0/24")
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert fsctl("allow", "-p", str(ports[0]), "203.0.113.0/24").returncode == 0


@pytest.mark.parametrize("args", [("doctor",), ("up", "-n")], ids=["doctor", "up"])
def test_closed_stdout_is_quiet(args: tuple[str, ...], docroot: Path, free_port: int) -> None:
    """`fsctl stats | head -1`: the reader leaves; no "fsctl: error: Broken pipe" (a server says
    why it stopped), the shell's SIGPIPE status, nothing left behind."""
    extra = ("-p", str(free_port), "-d", str(docroot)) if args[0] == "up" else ()
    proc = subprocess.Popen([str(FSCTL), *args, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    proc.stdout.close()
    try:
        stderr = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    assert proc.returncode == ExitStatus.BROKEN_PIPE, stderr
    if args[0] == "up":
        assert stderr == "fsctl: error: standard output was closed (broken pipe): server stopped\n"
        assert not pid_path(free_port).exists()
    else:
        assert stderr == ""


@pytest.mark.bpf
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_the_load_stops_the_start(sig: int, docroot: Path, free_port: int) -> None:
    """A signal landing while libbpf loads the object arrives inside libbpf's print callback
    (-vv: it prints every relocation), where a C frame swallowed it: the start went on as if
    nothing was asked. Each try must stop the start, print no traceback, leave nothing."""
    stopped_while_loading = 0
    for delay in (0.1, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5):
        proc = subprocess.Popen([str(FSCTL), "up", "-vv", "-p", str(free_port), "-d", str(docroot),
                                 "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=REPO)
        time.sleep(delay)
        proc.send_signal(sig)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            fsctl("down", "-p", str(free_port))
            pytest.fail(f"after {delay} s the signal was lost: {out[-300:]}")
        assert "Traceback" not in err, err[-2000:]
        assert proc.returncode in (0, ExitStatus.INTERRUPTED, -sig), (delay, proc.returncode)
        stopped_while_loading += "libbpf" in err and "listening" not in out
        assert_detached(free_port)
    assert stopped_while_loading, "no signal landed during the load: the test needs other delays"


@pytest.mark.bpf
def test_interface_down_is_served_with_a_warning(docroot: Path, free_port: int, servers: list[Server]) -> None:
    """Attaching to a device that is down works (it serves once up), but says so."""
    name = f"fsd{free_port}"  # a veth pair of this test's own, left down, without addresses
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=True)
    try:
        server = Server("-i", name, "-p", str(free_port), "-d", str(docroot), "--workers", "1")
        servers.append(server)
        server.wait_for("File server listening")
        assert f"Successfully attached TC program to {name}" in server.lines
        assert server.stop() == 0
        assert server.stderr == (f"fsctl: warning: interface {name} is down: no client reaches the server "
                                 f"through it until it is up (ip link set {name} up)\n")
        shown = subprocess.run(["bpftool", "net", "show", "dev", name], capture_output=True, text=True).stdout
        assert "fileserver" not in shown
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_user_space_only_as_a_user(free_port: int, servers: list[Server]) -> None:
    """`fsctl up -n` is what the "needs root" message offers: as a user it must serve (it
    failed on the pid file in /run), and a privileged port is said to be one."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run fsctl as nobody")
    nobody = ("setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups")
    www = str(REPO / "www")
    result = fsctl("up", "-n", "-p", "80", "-d", www, prefix=nobody, timeout=10)
    assert_one_line_error(result, ExitStatus.NO_PERMISSION, "port 80 is privileged")
    proc = subprocess.Popen([*nobody, str(FSCTL), "up", "-n", "-p", str(free_port), "-d", www, "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                assert get(free_port, "/")[0] == 200
                break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail(f"not serving: {proc.communicate(timeout=5)}")
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0 and err == "", err
    assert f"File server listening on port {free_port}" in out


@pytest.mark.bpf
def test_an_object_that_is_not_elf_is_named_so(docroot: Path, free_port: int, tmp_path: Path) -> None:
    """libbpf's own error codes (4000 and up) read "Unknown error 4001" through strerror()."""
    bpf_dir = tmp_path / "bpf"
    bpf_dir.mkdir()
    (bpf_dir / "fileserver.bpf.o").write_bytes(b"not an ELF object\n")
    shutil.copy(config.ABI_HEADER, bpf_dir / "fileserver.h")
    result = fsctl("up", "-p", str(free_port), "-d", str(docroot), env={"FILESERVER_BPF_DIR": str(bpf_dir)})
    assert_one_line_error(result, ExitStatus.ERROR, "fileserver.bpf.o): BPF object format invalid")
    assert_detached(free_port)


@pytest.mark.bpf
def test_deny_on_a_device_of_its_own(docroot: Path, free_port: int, servers: list[Server]) -> None:
    """The server holds the XDP program of its device: deny and allow act, and a /0 (a whole
    family denied) is done but said."""
    name = f"fsy{free_port}"
    subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", f"{name}p"], check=True)
    try:
        server = Server("-i", name, "-p", str(free_port), "-d", str(docroot), "--workers", "1")
        servers.append(server)
        server.wait_for("File server listening")
        assert any(line.startswith(f"Successfully attached XDP program to {name}") for line in server.lines)
        port = str(free_port)
        done = fsctl("deny", "-p", port, "203.0.113.0/24")
        assert (done.returncode, done.stdout, done.stderr) == (0, f"Denied 203.0.113.0/24 on port {port}\n", "")
        done = fsctl("deny", "-p", port, "::/0")
        assert done.returncode == 0 and done.stdout == f"Denied ::/0 on port {port}\n"
        assert done.stderr == f"fsctl: warning: ::/0 drops every IPv6 client of port {port} (fsctl allow ::/0 takes it back)\n"
        listed = fsctl("deny", "-p", port)
        assert listed.returncode == 0 and listed.stderr == ""
        assert [line.split()[0] for line in listed.stdout.splitlines()] == ["203.0.113.0/24", "::/0"]
        for network in ("203.0.113.0/24", "::/0"):
            assert fsctl("allow", "-p", port, network).returncode == 0
        assert server.stop() == 0
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


# `fsctl up` whose KernelPath is interrupted right after it attached (see the test below)
INTERRUPTED_AFTER_ATTACH = """
import sys
from fileserver_ctl import cli
from fileserver_ctl.kernel import KernelPath
enter = KernelPath.__enter__
def enter_then_interrupted(self):
    enter(self)
    raise KeyboardInterrupt
KernelPath.__enter__ = enter_then_interrupted
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.bpf
def test_an_interrupt_between_attach_and_its_undo_being_registered_leaves_nothing(
        docroot: Path, free_port: int) -> None:
    """Python raises a Ctrl-C at any bytecode: here right after the attach, before the ExitStack
    holds KernelPath's __exit__, so no unwinding detaches it. main() sweeps its own port last."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_AFTER_ATTACH, "up", "-p", str(free_port),
                           "-d", str(docroot), "--workers", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == ExitStatus.INTERRUPTED, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_detached(free_port)


# `fsctl` interrupted while it still imports the CLI: the signal comes as `from .cli import main`
# starts (a Ctrl-C in the first ~50 ms)
INTERRUPTED_WHILE_IMPORTING = """
import builtins, os, signal, sys
real_import = builtins.__import__
def import_interrupted(name, *args, **kwargs):
    if name == "cli":
        os.kill(os.getpid(), signal.SIGINT)
    return real_import(name, *args, **kwargs)
builtins.__import__ = import_interrupted
from fileserver_ctl import launch
sys.exit(launch.main())
"""


def test_ctrl_c_while_the_cli_imports_ends_with_one_line() -> None:
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_WHILE_IMPORTING, "stats"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (proc.returncode, proc.stderr) == (ExitStatus.INTERRUPTED, "fsctl: interrupted\n")


def test_the_fsctl_command_is_the_launcher() -> None:
    assert "fileserver_ctl.launch" in FSCTL.read_text()
