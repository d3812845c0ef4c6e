"""Ranges, conditionals and validators against nginx, on both answer paths.

Same machinery as test_nginx_parity.py (its docroot, servers, `observe` and comparison): each
case is sent raw to nginx and to this server with (`fsctl up`) and without (`fsctl up -n`) the
kernel fast path, and what a client can rely on must match; multipart/byteranges answers are
compared part by part (Content-Type, Content-Range, data), not by boundary. Case ids start with
"rng-" so that they never meet the other modules' cached observations. Files added to the
docroot: huge.bin (1 MiB, past the 256 KiB user space keeps in memory: sent with sendfile),
pre1970.txt (a fractional modification time before 1970) and future.txt (one ten years ahead).

nginx reads dates with ngx_parse_http_time: the three formats of RFC 9110 §5.6.7, the day name
skipped and whatever follows the time ignored, so an old browser's "; length=N" still matches;
a date nginx cannot read makes If-Modified-Since and If-Range false. The cases pin that reading.
Where this server deliberately answers otherwise, the case says why, as in the other modules.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_nginx_parity import (LM, OLDER, READ_TIMEOUT, G, H, Case, Reader,  # noqa: F401
                               add_file, assert_like_nginx, build_docroot, nginx, ours, r,
                               temporary_docroot)

S = "/small.txt"
HUGE = "/huge.bin"
HUGE_SIZE = 1 << 20
PRE_1970 = -300000000.5  # Wed, 29 Jun 1960 18:39:59.5 GMT
PRE_1970_LM = "Wed, 29 Jun 1960 18:39:59 GMT"  # the whole second it falls in
FUTURE = int(time.time()) + 10 * 365 * 86400

WHY_RANGE_HEAD = "RFC 9110 §14.2: Range MUST be ignored for methods other than GET (nginx serves it)"
WHY_LIST = "RFC 9110 §5.3: {} is a list, its field lines combine (nginx refuses a second one)"
WHY_IUS_INVALID = "RFC 9110 §13.1.4: an invalid If-Unmodified-Since date MUST be ignored"


def g(target: str, *headers: str) -> bytes:
    return r(G.format(target), *headers)


def ims(date: str, target: str = S) -> bytes:
    return g(target, f"If-Modified-Since: {date}")


def if_range(value: str, rng: str = "bytes=0-4") -> bytes:
    return g(S, f"Range: {rng}", f"If-Range: {value}")


def ranges(spec: str, target: str = S) -> bytes:
    return g(target, f"Range: {spec}")


def singles(count: int) -> str:
    return "bytes=" + ",".join(f"{i}-{i}" for i in range(count))


CASES = [
    # --- Range: what the single-range and multipart answers hold ---------------------------
    Case("rng-zero-suffix-and-first", ranges("bytes=-0,0-0"), (206,)),
    Case("rng-suffix-past-size-and-more", ranges("bytes=-200,0-1"), (200,)),
    Case("rng-unsorted", ranges("bytes=5-9,0-3"), (206,)),
    Case("rng-overlapping", ranges("bytes=0-3,2-5"), (206,)),
    Case("rng-same-twice", ranges("bytes=0-3,0-3"), (206,)),
    Case("rng-same-thrice", ranges("bytes=0-0,0-0,0-0"), (206,)),
    Case("rng-three-one-repeated", ranges("bytes=0-1,4-5,0-1"), (206,)),
    Case("rng-nearly-all-and-first", ranges("bytes=0-89,0-0"), (206,)),
    Case("rng-halves-sharing-a-byte", ranges("bytes=0-45,45-90"), (200,)),
    Case("rng-last-and-first", ranges("bytes=90-,0-0"), (206,)),
    Case("rng-unsatisfiable-and-first", ranges("bytes=91-,0-0"), (206,)),
    Case("rng-first-and-unsatisfiable", ranges("bytes=1-2,91-"), (206,)),
    Case("rng-32-parts", ranges(singles(32)), (206,)),
    Case("rng-33-parts", ranges(singles(33)), (206,), ours=(200,),
         why="RFC 9110 §14.2: a server MAY ignore a set of many small ranges (DoS): over 32 "
             "parts the whole file is sent (nginx: max_ranges is unlimited by default)"),
    Case("rng-two-fields", g(S, "Range: bytes=0-1", "Range: bytes=3-4"), (206,)),
    Case("rng-http10", r("GET /small.txt HTTP/1.0", "Range: bytes=0-1"), (206,)),
    Case("rng-http10-multipart", r("GET /small.txt HTTP/1.0", "Range: bytes=0-1,3-4"), (206,)),
    Case("rng-pipelined", ranges("bytes=0-1,3-4") + ranges("bytes=-3", HUGE)
         + ranges("bytes=999-") + g(S, "If-None-Match: *", "Range: bytes=0-1")
         + ranges(f"bytes=0-0,{HUGE_SIZE - 1}-", HUGE), (206, 206, 416, 304, 206),
         heads=(False,) * 5),
    # --- Range: syntax ---------------------------------------------------------------------
    Case("rng-no-space-after-colon", g(S, "Range:bytes=0-1"), (206,)),
    Case("rng-space-before-equals", ranges("bytes =0-1"), (200,)),
    Case("rng-space-inside", ranges("bytes=0 -1"), (206,)),
    Case("rng-tab-after-equals", ranges("bytes=\t0-1"), (416,)),
    Case("rng-trailing-space", ranges("bytes=0-1 "), (206,)),
    Case("rng-plus-sign", ranges("bytes=+0-1"), (416,)),
    Case("rng-leading-zeros", ranges("bytes=00-01"), (206,)),
    Case("rng-junk-after-last", ranges("bytes=0-0x"), (416,)),
    Case("rng-three-numbers", ranges("bytes=1-1-1"), (416,)),
    Case("rng-double-dash", ranges("bytes=--1"), (416,)),
    Case("rng-dash-only", ranges("bytes=-"), (416,)),
    Case("rng-no-ranges", ranges("bytes="), (200,)),
    Case("rng-unit-only", ranges("bytes"), (200,)),
    Case("rng-first-overflows", ranges("bytes=99999999999999999999-"), (416,)),
    Case("rng-last-overflows", ranges("bytes=0-99999999999999999999"), (416,)),
    Case("rng-suffix-overflows", ranges("bytes=-99999999999999999999"), (416,)),
    Case("rng-first-max-offset", ranges("bytes=9223372036854775807-"), (416,)),
    Case("rng-unit-capitalised", ranges("Bytes=0-1"), (206,)),
    Case("rng-parameter", ranges("bytes=0-1;x"), (416,)),
    Case("rng-no-unit", ranges("none"), (200,)),
    Case("rng-unit-repeated", ranges("bytes=0-1, bytes=3-4"), (416,)),
    # --- Range: an empty file ----------------------------------------------------------------
    Case("rng-empty-zero-suffix", ranges("bytes=-0", "/empty.txt"), (200,)),
    Case("rng-empty-from-1", ranges("bytes=1-", "/empty.txt"), (416,)),
    Case("rng-empty-two", ranges("bytes=0-0,1-1", "/empty.txt"), (200,)),
    Case("rng-empty-backwards", ranges("bytes=5-1", "/empty.txt"), (416,)),
    Case("rng-empty-malformed", ranges("bytes=x", "/empty.txt"), (416,)),
    Case("rng-empty-if-range", g("/empty.txt", "Range: bytes=0-0", f"If-Range: {LM}"), (200,)),
    # --- Range: a file sent with sendfile ------------------------------------------------------
    Case("rng-huge-zero-suffix", ranges("bytes=-0", HUGE), (416,)),
    Case("rng-huge-last-byte", ranges(f"bytes={HUGE_SIZE - 1}-", HUGE), (206,)),
    Case("rng-huge-past-end", ranges(f"bytes={HUGE_SIZE}-", HUGE), (416,)),
    Case("rng-huge-suffix-past-size", ranges(f"bytes=-{HUGE_SIZE + 1}", HUGE), (206,)),
    Case("rng-huge-all", ranges(f"bytes=0-{HUGE_SIZE - 1}", HUGE), (206,)),
    Case("rng-huge-first-and-last", ranges(f"bytes=0-0,{HUGE_SIZE - 1}-", HUGE), (206,)),
    Case("rng-huge-three-unsorted", ranges("bytes=262144-262200,0-10,500000-500010", HUGE),
         (206,)),
    Case("rng-huge-ims", ims(LM, HUGE), (304,)),
    Case("rng-huge-inm-star", g(HUGE, "If-None-Match: *"), (304,)),
    Case("rng-huge-if-range-date", g(HUGE, "Range: bytes=100-200", f"If-Range: {LM}"), (206,)),
    Case("rng-huge-if-range-older", g(HUGE, "Range: bytes=100-200", f"If-Range: {OLDER}"),
         (200,)),
    Case("rng-huge-head-range", r(H.format(HUGE), "Range: bytes=0-1"), (206,), ours=(200,),
         why=WHY_RANGE_HEAD),
    Case("rng-head-unsatisfiable", r(H.format(S), "Range: bytes=999-"), (416,), ours=(200,),
         why=WHY_RANGE_HEAD),
    # --- Range with conditionals ---------------------------------------------------------------
    Case("rng-range-ims-equal", g(S, f"If-Modified-Since: {LM}", "Range: bytes=0-1"), (304,)),
    Case("rng-range-ims-older", g(S, f"If-Modified-Since: {OLDER}", "Range: bytes=0-1"),
         (206,)),
    Case("rng-range-ius-equal", g(S, f"If-Unmodified-Since: {LM}", "Range: bytes=0-1"),
         (206,)),
    Case("rng-range-ius-older", g(S, f"If-Unmodified-Since: {OLDER}", "Range: bytes=0-1"),
         (412,), keeps_open=True),
    Case("rng-range-if-match-star", g(S, "If-Match: *", "Range: bytes=0-1"), (206,)),
    Case("rng-range-if-match", g(S, "If-Match: {etag}", "Range: bytes=0-1"), (206,), etag=True),
    Case("rng-range-if-match-other", g(S, 'If-Match: "x"', "Range: bytes=0-1"), (412,),
         keeps_open=True),
    Case("rng-unsatisfiable-if-match-other", g(S, 'If-Match: "x"', "Range: bytes=999-"),
         (412,), keeps_open=True),
    Case("rng-range-inm-other", g(S, 'If-None-Match: "x"', "Range: bytes=0-1"), (206,)),
    Case("rng-range-inm-if-range", g(S, "If-None-Match: {etag}", "Range: bytes=0-1",
                                     "If-Range: {etag}"), (304,), etag=True),
    # --- If-Range ------------------------------------------------------------------------------
    Case("rng-if-range-etag-space", if_range("{etag} "), (206,), etag=True),
    Case("rng-if-range-etag-list", if_range('{etag}, "x"'), (200,), etag=True),
    Case("rng-if-range-unquoted", if_range("x"), (200,)),
    Case("rng-if-range-star", if_range("*"), (200,)),
    Case("rng-if-range-empty", if_range(""), (200,)),
    Case("rng-if-range-no-range", g(S, "If-Range: {etag}"), (200,), etag=True),
    Case("rng-if-range-repeated", g(S, "Range: bytes=0-1", f"If-Range: {LM}", f"If-Range: {LM}"),
         (400,)),
    Case("rng-if-range-rfc850", if_range("Sunday, 06-Nov-94 08:49:37 GMT"), (206,)),
    Case("rng-if-range-asctime", if_range("Sun Nov  6 08:49:37 1994"), (206,)),
    Case("rng-if-range-date-param", if_range(f"{LM}; length=91"), (206,)),
    Case("rng-if-range-lower-case", if_range("sun, 06 nov 1994 08:49:37 gmt"), (200,)),
    Case("rng-if-range-one-digit-day", if_range("Sun, 6 Nov 1994 08:49:37 GMT"), (200,)),
    # --- If-Modified-Since: which dates are dates (RFC 9110 §5.6.7) -----------------------
    Case("rng-ims-param", ims(f"{LM}; length=91"), (304,)),
    Case("rng-ims-utc", ims("Sun, 06 Nov 1994 08:49:37 UTC"), (304,)),
    Case("rng-ims-no-zone", ims("Sun, 06 Nov 1994 08:49:37"), (304,)),
    Case("rng-ims-zero-offset", ims("Sun, 06 Nov 1994 08:49:37 +0000"), (304,)),
    Case("rng-ims-other-zone", ims("Sun, 06 Nov 1994 09:49:37 +0100"), (200,)),
    Case("rng-ims-wrong-day-name", ims("Mon, 06 Nov 1994 08:49:37 GMT"), (304,)),
    Case("rng-ims-no-day-name-comma", ims(", 06 Nov 1994 08:49:37 GMT"), (304,)),
    Case("rng-ims-no-space-after-comma", ims("Sun,06 Nov 1994 08:49:37 GMT"), (304,)),
    Case("rng-ims-two-spaces-after-comma", ims("Sun,  06 Nov 1994 08:49:37 GMT"), (304,)),
    Case("rng-ims-trailing-space", ims(f"{LM} "), (304,)),
    Case("rng-ims-fraction", ims("Sun, 06 Nov 1994 08:49:37.5 GMT"), (304,)),
    Case("rng-ims-zone-glued", ims("Sun, 06 Nov 1994 08:49:37GMT"), (304,)),
    Case("rng-ims-rfc850-no-zone", ims("Sunday, 06-Nov-94 08:49:37"), (304,)),
    Case("rng-ims-rfc850-param", ims("Sunday, 06-Nov-94 08:49:37 GMT; x"), (304,)),
    Case("rng-ims-asctime-one-space", ims("Sun Nov 6 08:49:37 1994"), (304,)),
    Case("rng-ims-asctime-two-digit-day", ims("Sun Nov 06 08:49:37 1994"), (304,)),
    Case("rng-ims-asctime-zone", ims("Sun Nov  6 08:49:37 1994 GMT"), (304,)),
    Case("rng-ims-lower-case", ims("sun, 06 nov 1994 08:49:37 gmt"), (200,)),
    Case("rng-ims-head-lower-case", r(H.format(S), "If-Modified-Since: sun, 06 nov 1994 "
                                      "08:49:37 gmt"), (200,)),
    Case("rng-ims-no-day-name", ims("06 Nov 1994 08:49:37 GMT"), (200,)),
    Case("rng-ims-one-digit-day", ims("Sun, 6 Nov 1994 08:49:37 GMT"), (200,)),
    Case("rng-ims-imf-two-digit-year", ims("Sun, 06 Nov 94 08:49:37 GMT"), (200,)),
    Case("rng-ims-imf-dashes", ims("Sun, 06-Nov-1994 08:49:37 GMT"), (200,)),
    Case("rng-ims-one-digit-hour", ims("Sun, 06 Nov 1994 8:49:37 GMT"), (200,)),
    Case("rng-ims-rfc850-four-digit-year", ims("Sunday, 06-Nov-1994 08:49:37 GMT"), (200,)),
    Case("rng-ims-asctime-two-digit-year", ims("Sun Nov  6 08:49:37 94"), (200,)),
    Case("rng-ims-five-digit-year", ims("Sun, 06 Nov 01994 08:49:37 GMT"), (200,)),
    Case("rng-ims-no-seconds", ims("Sun, 06 Nov 1994 08:49 GMT"), (200,)),
    Case("rng-ims-second-60", ims("Sun, 06 Nov 1994 08:49:60 GMT"), (200,)),
    Case("rng-ims-february-31", ims("Sun, 31 Feb 1994 08:49:37 GMT"), (200,)),
    Case("rng-ims-month-upper-case", ims("Sun, 06 NOV 1994 08:49:37 GMT"), (304,), ours=(200,),
         compare=False, why="RFC 9110 §5.6.7: an HTTP-date is case-sensitive (nginx tells a "
                            "month by its first letters: NOV, even Nxx, is November)"),
    Case("rng-ims-two-dates", ims(f"{LM}, {LM}"), (304,), ours=(200,), compare=False,
         why="RFC 9110 §13.1.3: an If-Modified-Since of more than one member MUST be ignored"),
    Case("rng-ims-repeated", g(S, f"If-Modified-Since: {LM}", f"If-Modified-Since: {LM}"),
         (400,)),
    # --- If-Unmodified-Since, If-Match, If-None-Match and their order (RFC 9110 §13.2.2) ----
    Case("rng-ius-older-asctime", g(S, "If-Unmodified-Since: Sat Nov  5 08:49:37 1994"), (412,),
         keeps_open=True),
    Case("rng-ius-older-lower-case", g(S, "If-Unmodified-Since: sat, 05 nov 1994 08:49:37 gmt"),
         (412,), ours=(200,), compare=False, why=WHY_IUS_INVALID),
    Case("rng-ius-older-two-dates", g(S, f"If-Unmodified-Since: {OLDER}, {OLDER}"), (412,),
         ours=(200,), compare=False,
         why="RFC 9110 §13.1.4: a list of dates is not a valid date, it MUST be ignored"),
    Case("rng-ius-later", g(S, "If-Unmodified-Since: Sun, 06 Nov 2094 08:49:37 GMT"), (200,)),
    Case("rng-ius-older-ims-equal", g(S, f"If-Unmodified-Since: {OLDER}",
                                      f"If-Modified-Since: {LM}"), (412,), keeps_open=True),
    Case("rng-ius-older-inm", g(S, f"If-Unmodified-Since: {OLDER}", "If-None-Match: {etag}"),
         (412,), etag=True, keeps_open=True),
    Case("rng-ius-equal-inm", g(S, f"If-Unmodified-Since: {LM}", "If-None-Match: {etag}"),
         (304,), etag=True),
    Case("rng-if-match-inm", g(S, "If-Match: {etag}", "If-None-Match: {etag}"), (304,),
         etag=True),
    Case("rng-inm-if-match-other", g(S, "If-None-Match: {etag}", 'If-Match: "x"'), (412,),
         etag=True, keeps_open=True),
    Case("rng-if-match-list-first", g(S, 'If-Match: {etag}, "x"'), (200,), etag=True),
    Case("rng-if-match-list-last", g(S, 'If-Match: "x", {etag}'), (200,), etag=True),
    Case("rng-if-match-head-other", r(H.format(S), 'If-Match: "x"'), (412,), keeps_open=True),
    Case("rng-if-match-two-lines", g(S, 'If-Match: "x"', "If-Match: {etag}"), (400,),
         ours=(200,), etag=True, compare=False, why=WHY_LIST.format("If-Match")),
    Case("rng-if-match-ius-older", g(S, "If-Match: {etag}", f"If-Unmodified-Since: {OLDER}"),
         (412,), ours=(200,), etag=True, keeps_open=True,
         why="RFC 9110 §13.2.2: If-Unmodified-Since is evaluated only without If-Match"),
    Case("rng-inm-ims-older", g(S, "If-None-Match: {etag}", f"If-Modified-Since: {OLDER}"),
         (200,), ours=(304,), etag=True,
         why="RFC 9110 §13.1.3: If-Modified-Since MUST be ignored with If-None-Match"),
    Case("rng-inm-two-lines", g(S, 'If-None-Match: "x"', "If-None-Match: {etag}"), (400,),
         ours=(304,), etag=True, compare=False, why=WHY_LIST.format("If-None-Match")),
    Case("rng-inm-two-lines-match-first", g(S, "If-None-Match: {etag}", 'If-None-Match: "x"'),
         (400,), ours=(304,), etag=True, compare=False, why=WHY_LIST.format("If-None-Match")),
    Case("rng-inm-list-weak-other", g(S, 'If-None-Match: {etag}, W/"x"'), (304,), etag=True),
    Case("rng-inm-list-weak-other-first", g(S, 'If-None-Match: W/"x", {etag}'), (304,),
         etag=True),
    Case("rng-inm-list-no-space", g(S, 'If-None-Match: "x",{etag}'), (304,), etag=True),
    Case("rng-inm-lower-weak", g(S, "If-None-Match: w/{etag}"), (200,), etag=True),
    Case("rng-inm-junk-after", g(S, "If-None-Match: {etag} junk"), (200,), etag=True),
    Case("rng-inm-junk-glued", g(S, "If-None-Match: {etag}junk"), (200,), etag=True),
    Case("rng-inm-star-in-list", g(S, 'If-None-Match: *, "x"'), (200,)),
    Case("rng-inm-star-last", g(S, 'If-None-Match: "x", *'), (200,)),
    Case("rng-inm-empty", g(S, "If-None-Match: "), (200,)),
    Case("rng-inm-empty-tag", g(S, 'If-None-Match: ""'), (200,)),
    Case("rng-inm-junk-ims-equal", g(S, "If-None-Match: junk", f"If-Modified-Since: {LM}"),
         (200,)),
    Case("rng-inm-empty-ims-equal", g(S, "If-None-Match: ", f"If-Modified-Since: {LM}"), (200,)),
    Case("rng-if-match-junk", g(S, "If-Match: junk"), (412,), keeps_open=True),
    Case("rng-if-match-empty", g(S, "If-Match: "), (412,), keeps_open=True),
    Case("rng-if-match-ims-equal", g(S, "If-Match: {etag}", f"If-Modified-Since: {LM}"), (304,),
         etag=True),
    Case("rng-if-match-star-inm-star", g(S, "If-Match: *", "If-None-Match: *"), (304,)),
    Case("rng-ius-empty-ims-equal", g(S, "If-Unmodified-Since: ", f"If-Modified-Since: {LM}"),
         (412,), ours=(304,), compare=False, why=WHY_IUS_INVALID),
    Case("rng-ims-empty", g(S, "If-Modified-Since: "), (200,)),
    # --- validators of odd modification times ----------------------------------------------
    Case("rng-pre-1970-get", g("/pre1970.txt"), (200,), ours=(200,), compare=False,
         why="nginx's Last-Modified of a file older than 1970 is the epoch; ours is its mtime"),
    Case("rng-pre-1970-ims", ims(PRE_1970_LM, "/pre1970.txt"), (304,), ours=(304,),
         compare=False,
         why="nginx's Last-Modified of a file older than 1970 is the epoch; ours is its mtime"),
    Case("rng-pre-1970-if-range", g("/pre1970.txt", "Range: bytes=0-0",
                                    f"If-Range: {PRE_1970_LM}"), (206,), ours=(206,),
         compare=False,
         why="nginx's Last-Modified of a file older than 1970 is the epoch; ours is its mtime"),
]


def build_ranges_docroot(base: Path) -> Path:
    """test_nginx_parity's docroot with a file past the memory limit and two odd mtimes."""
    root = build_docroot(base)
    add_file(root, "huge.bin", bytes(range(256)) * (HUGE_SIZE // 256))
    add_file(root, "pre1970.txt", b"old\n", PRE_1970)
    add_file(root, "future.txt", b"ahead\n", FUTURE)
    return root


@pytest.fixture(scope="module")
def docroot() -> Iterator[Path]:
    with temporary_docroot("parity-ranges-", build_ranges_docroot) as root:
        yield root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_nginx_ranges(case: Case, nginx: int, ours: tuple[str, int]):  # noqa: F811
    assert_like_nginx(case, nginx, ours, persistence=True)


def _exchange(port: int, request: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(request)
        return Reader(sock).answer(request.startswith(b"HEAD "))


def _one(headers: dict[str, list[str]], name: str) -> str:
    values = headers[name]
    assert len(values) == 1, (name, values)
    return values[0]


def test_own_last_modified_validates(ours: tuple[str, int]):  # noqa: F811
    """The Last-Modified sent for a file modified at a fraction of a second before 1970 is what
    If-Modified-Since and If-Range then match: the whole second the mtime falls in."""
    _, port = ours
    status, headers, _ = _exchange(port, g("/pre1970.txt"))
    assert status == 200
    sent = _one(headers, "last-modified")
    assert sent == PRE_1970_LM
    assert _exchange(port, ims(sent, "/pre1970.txt"))[0] == 304
    assert _exchange(port, g("/pre1970.txt", "Range: bytes=1-2", f"If-Range: {sent}"))[:1] == (206,)


@pytest.mark.parametrize("request_", [
    g("/future.txt"),
    r(H.format("/future.txt")),
    g("/future.txt", "Range: bytes=1-2"),
    g("/future.txt", "Range: bytes=0-0,2-3"),
    g("/future.txt", "If-None-Match: *"),
], ids=["get", "head", "range", "multipart", "304"])
def test_last_modified_not_after_date(ours: tuple[str, int], request_: bytes):  # noqa: F811
    """RFC 9110 §8.8.2.1: a modification time later than the answer's Date is replaced by it
    (nginx sends the mtime). Not among CASES: the kernel path answers a second later."""
    _, port = ours
    for _ in range(3):  # the kernel cache may take the file in after the first answer
        status, headers, _ = _exchange(port, request_)
        assert status in (200, 206, 304)
        assert _one(headers, "last-modified") == _one(headers, "date")
