"""The demo page in a real browser, and the stats endpoint it polls.

The endpoint tests are plain HTTP against `fsctl up` (kernel path) and `fsctl up -n`. The browser
tests open www/demo.html in Debian's chromium driven by Playwright (never `playwright install`),
run the comparison, check its numbers against the server's own counters, and save screenshots
to artifacts/. They skip with the reason when chromium or playwright is missing.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from fileserver_ctl import config, http_status
from servers import pick_port, start_fsctl

REPO = Path(__file__).resolve().parent.parent
WWW = REPO / "www"
ARTIFACTS = REPO / "artifacts"
PORTS = range(18800, 18900)
STARTUP_TIMEOUT = 30.0
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REQUESTS = 200  # per path, as the page suggests
# User-space answers reach the shared counters once a second; the endpoint reuses a snapshot
# for http_status.MAX_AGE: a read this long after a request includes it.
SETTLE = 1.1 + http_status.MAX_AGE


@dataclass
class Server:
    port: int
    proc: subprocess.Popen
    docroot: Path
    kernel_path: bool

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection (so the kernel path may answer it)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def stats(self) -> dict:
        """The endpoint's figures (200 required)."""
        status, headers, body = self.get(http_status.PATH)
        assert status == 200, body
        return json.loads(body)

    def cli_stats(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "fileserver_ctl", "stats", "--json", "-p", str(self.port)],
                             capture_output=True, text=True, timeout=30, cwd=REPO, check=True)
        return json.loads(out.stdout)


@contextmanager
def running(docroot: Path, *, kernel_path: bool) -> Iterator[Server]:
    """`fsctl up` on lo with `docroot` until the block ends; it must stop cleanly."""
    if os.geteuid() != 0:
        pytest.skip("fsctl up keeps its shared counters in /run/fileserver: needs root")
    if kernel_path and not config.BPF_OBJECT.exists():
        pytest.skip(f"{config.BPF_OBJECT} not built (run: make -C bpf)")
    port = pick_port(PORTS)
    run = start_fsctl(["-p", str(port), "-d", str(docroot), "--workers", "2",
                       *([] if kernel_path else ["-n"])], port)
    try:
        yield Server(port, run.proc, docroot, kernel_path)
    finally:
        code = run.stop()
        assert code == 0, "".join(run.output)
        assert not config.pin_dir(port).exists()
        assert "Traceback" not in "".join(run.output)


@pytest.fixture(scope="module", params=[pytest.param(True, id="kernel", marks=pytest.mark.bpf),
                                        pytest.param(False, id="user-only")])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    docroot = tmp_path_factory.mktemp("demo") / "www"
    shutil.copytree(WWW, docroot)
    with running(docroot, kernel_path=request.param) as srv:
        yield srv


# --- the stats endpoint, no browser ----------------------------------------------------------

def test_endpoint_is_fsctl_stats_json(server: Server):
    status, headers, body = server.get(http_status.PATH)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert int(headers["content-length"]) == len(body)
    figures = json.loads(body)
    cli = server.cli_stats()
    # the same list, not a second one; client addresses stay with the operator's `fsctl stats`
    assert figures.keys() == cli.keys() - {"top_clients"}
    assert figures["port"] == server.port
    assert figures["kernel_path"] is server.kernel_path
    for name in ("kernel_responses", "user_responses", "cached_files", "handed_off"):
        assert isinstance(figures[name], int) and figures[name] >= 0


def test_endpoint_figures_follow_the_traffic(server: Server):
    time.sleep(SETTLE)  # earlier requests counted and any shared snapshot expired
    before = server.stats()
    for _ in range(5):
        assert server.get("/assets/probe.txt")[0] == 200
    time.sleep(SETTLE)
    after = server.stats()
    if server.kernel_path:
        assert after["kernel_responses"] - before["kernel_responses"] == 5
        assert after["cached_files"] > 0
    else:
        assert after["kernel_responses"] == 0 and after["cached_files"] == 0
        # the five files and the first stats request
        assert after["user_responses"] - before["user_responses"] == 6
    assert after["uptime_seconds"] > before["uptime_seconds"]


def test_endpoint_head_query_and_methods(server: Server):
    status, headers, body = server.get(http_status.PATH, "HEAD")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, _, body = server.get(http_status.PATH + "?t=1")
    assert status == 200 and json.loads(body)["port"] == server.port
    assert server.get(http_status.PATH, "POST")[0] == 405
    assert server.get("/_fileserver/other.json")[0] == 404


def test_a_file_of_that_name_wins(server: Server):
    if server.kernel_path:
        pytest.skip("checked with user space only: the kernel cache would pick the file up too")
    shadow = server.docroot / http_status.PATH.lstrip("/")
    shadow.parent.mkdir()
    try:
        shadow.write_text('{"a": "file"}')
        status, _, body = server.get(http_status.PATH)
        assert status == 200 and json.loads(body) == {"a": "file"}
    finally:
        shutil.rmtree(shadow.parent)
    assert "port" in server.stats()


@pytest.mark.bpf
def test_maps_gone_is_503_and_the_server_lives_on(tmp_path: Path):
    docroot = tmp_path / "www"
    shutil.copytree(WWW, docroot)
    with running(docroot, kernel_path=True) as srv:
        (config.pin_dir(srv.port) / "file_cache").unlink()
        status, headers, body = srv.get(http_status.PATH)
        assert status == 503
        assert headers["retry-after"] == "1" and headers["cache-control"] == "no-store"
        assert "error" in json.loads(body)
        assert srv.get("/index.html")[0] == 200
        assert srv.get("/assets/%70robe.txt")[0] == 200  # user space


# --- the page in chromium --------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright missing (pip install playwright)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def demo_page(browser, srv: Server, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"http://127.0.0.1:{srv.port}/demo.html")
        yield page
        assert not errors, errors
    finally:
        page.close()


def run_comparison(page, n: int) -> dict[str, dict[str, float]]:
    """Click the comparison and return each card's data-value figures."""
    page.fill("#count", str(n))
    page.click("#run")
    page.wait_for_selector("#results:not([hidden])", timeout=90_000)
    cards = {}
    for path in ("kernel", "user"):
        card = page.locator(f'[data-path="{path}"]')
        figures = {name: float(card.locator(f'[data-field="{name}"]').get_attribute("data-value") or "nan")
                   for name in ("median", "p90", "p99", "kernel", "user")}
        figures["timed"] = float(card.get_attribute("data-timed"))
        cards[path] = figures
    return cards


def live_updates(page) -> int:
    return int(page.locator("#live").get_attribute("data-updates") or 0)


def save(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    return path


def test_demo_page_measures_both_paths(browser, server: Server):
    with demo_page(browser, server, 1280, 900) as page:
        page.wait_for_function("Number(document.querySelector('#live').dataset.updates) >= 1", timeout=10_000)
        before = server.cli_stats()
        cards = run_comparison(page, REQUESTS)
        time.sleep(SETTLE)
        after = server.cli_stats()

        for path, figures in cards.items():
            assert figures["timed"] == REQUESTS, (path, figures)
            for name in ("median", "p90", "p99"):
                assert math.isfinite(figures[name]) and 0 < figures[name] < 10_000, (path, figures)
            assert figures["median"] <= figures["p90"] <= figures["p99"]
        if server.kernel_path:
            assert (cards["kernel"]["kernel"], cards["kernel"]["user"]) == (REQUESTS, 0)
            assert after["kernel_responses"] - before["kernel_responses"] >= REQUESTS
            assert "times faster" in page.inner_text("#verdict") or "not slower" in page.inner_text("#verdict")
        else:
            assert (cards["kernel"]["kernel"], cards["kernel"]["user"]) == (0, REQUESTS)
            assert after["kernel_responses"] == 0
            assert "without the kernel path" in page.inner_text("#verdict")
        assert (cards["user"]["kernel"], cards["user"]["user"]) == (0, REQUESTS)
        assert after["user_responses"] - before["user_responses"] >= REQUESTS
        assert page.locator("#chart polyline").count() == 2
        assert page.locator("#compare .off").count() == 0  # nothing marked as unexpected

        seen = live_updates(page)  # the live panel goes on after the run
        page.wait_for_function(f"Number(document.querySelector('#live').dataset.updates) >= {seen + 2}",
                               timeout=10_000)
        shown = int(page.inner_text('[data-live="kernel_responses"]').replace(",", ""))
        assert shown == server.cli_stats()["kernel_responses"]
        save(page, f"demo-desktop-{'kernel' if server.kernel_path else 'user-only'}.png")


def test_demo_page_fits_a_phone(browser, server: Server):
    if not server.kernel_path:
        pytest.skip("the layout is the same without the kernel path")
    with demo_page(browser, server, 375, 740) as page:
        cards = run_comparison(page, 50)
        assert cards["kernel"]["timed"] == 50
        page.wait_for_function("document.querySelector('#chart polyline') !== null")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375  # no sideways scrolling
        chart = page.locator("#chart").bounding_box()
        assert chart is not None and chart["width"] <= 375
        save(page, "demo-phone.png")
