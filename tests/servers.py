"""What the end-to-end tests share: a free port, and `fsctl up` started until it listens
(bench/harness.py's start_fsctl, which the benchmarks use too)."""

from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

import pytest

from fileserver_ctl import config, kernel

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from harness import Fsctl, start_fsctl  # noqa: E402,F401  (re-exported for the tests)

def _test_ports() -> range:
    """18000-18999, or FILESERVER_TEST_PORTS ("FIRST-LAST") where runs share a machine and each
    has its own range."""
    first, _, last = os.environ.get("FILESERVER_TEST_PORTS", "18000-18999").partition("-")
    return range(int(first), int(last) + 1)


TEST_PORTS = _test_ports()


def port_is_free(port: int) -> bool:
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, port))
            except OSError:
                return False
    return True


def pick_port(ports: range = TEST_PORTS) -> int:
    """A port of `ports` nobody listens on and no server has pins or a run state for, picked at
    random so that concurrent runs rarely meet; skips the test when there is none."""
    for port in random.sample(ports, min(len(ports), 100)):
        if (port_is_free(port) and not config.pin_dir(port).exists()
                and not kernel.state_path(port).exists()):
            return port
    pytest.skip(f"no free port in {ports.start}-{ports.stop - 1}")


def start_ours(kind: str, docroot: Path, *args: str) -> tuple[int, Fsctl]:
    """`fsctl up ARGS` serving docroot on a free port over lo, on one of its answer paths: "user"
    (-n) or "kernel" (skipped where the kernel path cannot run). Returns (port, server)."""
    if kind == "kernel":
        if os.geteuid() != 0:
            pytest.skip("the kernel path needs root")
        if not config.BPF_OBJECT.exists():
            pytest.skip(f"{config.BPF_OBJECT} is not built (make -C bpf)")
    port = pick_port()
    env = {"FILESERVER_PORT": str(port), "FILESERVER_DOCROOT": str(docroot),
           "FILESERVER_INTERFACE": "lo"}
    return port, start_fsctl([*(["-n"] if kind == "user" else []), *args], port, env=env)
