"""The systemd unit in contrib/ is valid for systemd and points at what `make setup` leaves."""

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "contrib" / "ebpf-fileserver.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies_against_this_checkout(tmp_path: Path) -> None:
    if not (REPO / ".venv" / "bin" / "fsctl").exists():
        pytest.skip(".venv/bin/fsctl missing: run make setup")
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/ebpf-fileserver", str(REPO)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if UNIT.name in line]
    assert done.returncode == 0 and not problems, done.stdout + done.stderr


def test_unit_stops_with_sigterm_and_restarts_on_failure() -> None:
    text = UNIT.read_text()
    assert "KillSignal=SIGTERM" in text and "Restart=on-failure" in text
    assert "ExecStart=/opt/ebpf-fileserver/.venv/bin/fsctl up" in text
