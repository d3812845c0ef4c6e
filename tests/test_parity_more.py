"""More differential cases against nginx, on both answer paths: what test_nginx_parity.py left out.

Same machinery as test_nginx_parity.py (its docroot, servers, `observe` and comparison): each
case is sent raw to nginx and to this server with (`fsctl up`) and without (`fsctl up -n`) the
kernel fast path, and what a client can rely on must match. A few files are added to the
docroot for the media type cases. Case ids start with "more-" so that they never meet the
parity module's cached observations.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from test_nginx_parity import (G, H, Case, add_file, assert_like_nginx, build_docroot,  # noqa: F401
                               nginx, ours, r, temporary_docroot)  # (nginx, ours: fixtures)

EXTRA_FILES = {  # name -> content, for the media type cases
    "seg.ts": b"G\x40\x00\x10",
    "tune.mid": b"MThd",
    "tune.midi": b"MThd",
    "clip.3gp": b"\x00\x00\x00\x18ftyp3gp4",
    "clip.3gpp": b"\x00\x00\x00\x18ftyp3gp4",
    "song.kar": b"MThd",
    "feed.rss": b"<rss/>\n",
    "app.war": b"PK\x03\x04",
    "app.ear": b"PK\x03\x04",
    "list.asx": b"<asx/>\n",
    "ca.der": b"0\x82",
}
EXTRA_DIRS = ["sp ace", "\u00fcn\u00ef", "q?x", "h#x", "pc%41", "a+b"]  # for the redirect cases

S = "/small.txt"
WHY_501 = "RFC 9110 §9.1: an unrecognised method SHOULD get 501, nginx says 405"
UPGRADE_WS = ("Connection: Upgrade", "Upgrade: websocket")
CASES = [
    # a path through a regular file: nginx's open() fails with ENOTDIR, which is 404
    Case("more-file-as-dir", r(G.format("/small.txt/x")), (404,)),
    Case("more-file-as-dir-deeper", r(G.format("/sub/page.txt/a/b")), (404,)),
    Case("more-head-file-as-dir", r(H.format("/small.txt/x")), (404,)),
    # media types where the system's table (mimetypes) names a wrong or odd one: .ts is an MPEG
    # transport stream (HLS segments), not a Qt Linguist file; .mid is audio/midi, not SP-MIDI
    Case("more-type-ts", r(G.format("/seg.ts")), (200,)),
    Case("more-type-mid", r(G.format("/tune.mid")), (200,)),
    Case("more-type-midi", r(G.format("/tune.midi")), (200,)),
    Case("more-type-kar", r(G.format("/song.kar")), (200,)),
    Case("more-type-3gp", r(G.format("/clip.3gp")), (200,)),
    Case("more-type-3gpp", r(G.format("/clip.3gpp")), (200,)),
    Case("more-type-rss", r(G.format("/feed.rss")), (200,)),
    Case("more-type-war", r(G.format("/app.war")), (200,)),
    Case("more-type-ear", r(G.format("/app.ear")), (200,)),
    Case("more-type-asx", r(G.format("/list.asx")), (200,)),
    Case("more-type-der", r(G.format("/ca.der")), (200,)),
    Case("more-type-ts-head", r(H.format("/seg.ts")), (200,)),
    # a well-formed method nobody implements: 501 (RFC 9110 §9.1, as test_nginx_parity's
    # unknown-method says), and the connection goes on as after nginx's 405: the request is
    # framed like any other. llhttp refuses methods it does not know, and those were 501 or
    # even 400 (the RTSP names, "_X") and closed.
    Case("more-method-foo", r("FOO /small.txt HTTP/1.1"), (405,), ours=(501,), why=WHY_501),
    Case("more-method-foo-pipelined", r("FOO /small.txt HTTP/1.1", "Content-Length: 3", body=b"abc")
         + r(G.format(S)), (405, 200), heads=(False, False), ours=(501, 200), why=WHY_501),
    Case("more-method-foo-then-head", r("FOO /small.txt HTTP/1.1") + r(H.format(S))
         + r("BAR /sub/ HTTP/1.1") + r(G.format("/f1k.bin")), (405, 200, 405, 200),
         heads=(False, True, False, False), ours=(501, 200, 501, 200), why=WHY_501),
    Case("more-method-rtsp-play", r("PLAY /small.txt HTTP/1.1"), (405,), ours=(501,), why=WHY_501),
    Case("more-method-rtsp-describe", r("DESCRIBE /small.txt HTTP/1.1"), (405,), ours=(501,),
         why=WHY_501),
    Case("more-method-get-parameter", r("GET_PARAMETER /small.txt HTTP/1.1"), (405,),
         ours=(501,), why=WHY_501),
    Case("more-method-pri", r("PRI /small.txt HTTP/1.1"), (405,), ours=(501,), why=WHY_501),
    Case("more-method-underscore-first", r("_GET /small.txt HTTP/1.1"), (405,), ours=(501,),
         why=WHY_501),
    Case("more-method-dash-first", r("-X /small.txt HTTP/1.1"), (405,), ours=(501,), why=WHY_501),
    Case("more-method-long", r("ABCDEFGHIJKLMNOPQRSTUVWXYZ /small.txt HTTP/1.1"), (405,),
         ours=(501,), why=WHY_501),
    Case("more-method-http10", r("FOO /small.txt HTTP/1.0", "Connection: keep-alive"), (405,),
         ours=(501,), why=WHY_501),
    Case("more-method-digit", r("G3T /small.txt HTTP/1.1"), (400,)),
    Case("more-method-lower", r("foo /small.txt HTTP/1.1"), (400,)),
    # a folder without its slash: the Location names the folder by its normalised path, as
    # nginx's does; the target as sent made "//sub" a network-path reference ("//sub/": the
    # host "sub", RFC 3986 §4.2) and kept dot segments and needless escapes
    Case("more-redirect-double-slash", r(G.format("//sub")), (301,)),
    Case("more-redirect-triple-slash-query", r(G.format("///sub?x=1")), (301,)),
    Case("more-redirect-dot-segments", r(G.format("/sub/../sub")), (301,)),
    Case("more-redirect-dot", r(G.format("/./sub")), (301,)),
    Case("more-redirect-escaped-letter", r(G.format("/s%75b?x=1")), (301,)),
    Case("more-redirect-space", r(G.format("/sp%20ace")), (301,)),
    Case("more-redirect-utf8", r(G.format("/%C3%BCn%C3%AF")), (301,)),
    Case("more-redirect-question-mark", r(G.format("/q%3Fx")), (301,)),
    Case("more-redirect-hash", r(G.format("/h%23x")), (301,)),
    Case("more-redirect-percent", r(G.format("/pc%2541")), (301,)),
    Case("more-redirect-plus", r(G.format("/a+b?c")), (301,)),
    Case("more-redirect-head-double-slash", r(H.format("//sub")), (301,)),
    # RFC 9110 §4.2.4: userinfo in an http(s) target is to be treated as an error
    Case("more-absolute-userinfo", r(G.format("http://u:p@localhost/small.txt")), (400,)),
    Case("more-absolute-user-only", r(G.format("http://u@localhost/small.txt")), (400,)),
    Case("more-absolute-userinfo-https", r(G.format("https://u@localhost/small.txt")), (400,)),
    Case("more-absolute-at-in-path", r(G.format("http://localhost/sub/a@b")), (404,)),
    Case("more-absolute-at-in-query", r(G.format("http://localhost/small.txt?a@b")), (200,)),
    # RFC 9112 §6.1: a transfer coding the server does not understand SHOULD get 501
    Case("more-te-gzip-chunked", r(G.format(S), "Transfer-Encoding: gzip, chunked",
                                   body=b"0\r\n\r\n"), (501,)),
    Case("more-te-identity-chunked", r(G.format(S), "Transfer-Encoding: identity, chunked",
                                       body=b"0\r\n\r\n"), (501,)),
    Case("more-te-empty", r(G.format(S), "Transfer-Encoding: "), (501,)),
    Case("more-te-whitespace", r(G.format(S), "Transfer-Encoding:\t"), (501,)),
    Case("more-te-gzip-chunked-post", r("POST /small.txt HTTP/1.1", "Transfer-Encoding: gzip, chunked",
                                        body=b"0\r\n\r\n"), (501,)),
    # RFC 9110 §7.8: a server MAY ignore Upgrade; nginx does, and the connection goes on
    Case("more-upgrade-websocket", r(G.format(S), *UPGRADE_WS), (200,)),
    Case("more-upgrade-websocket-head", r(H.format(S), *UPGRADE_WS), (200,)),
    Case("more-upgrade-websocket-404", r(G.format("/missing"), *UPGRADE_WS), (404,)),
    Case("more-upgrade-websocket-post", r("POST /small.txt HTTP/1.1", *UPGRADE_WS,
                                          "Content-Length: 0"), (405,)),
    Case("more-upgrade-websocket-pipelined", r(G.format(S), *UPGRADE_WS) + r(G.format("/f1k.bin")),
         (200, 200), heads=(False, False)),
    Case("more-upgrade-h2c-pipelined", r(G.format(S), "Connection: Upgrade, HTTP2-Settings",
                                         "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
         + r(H.format("/f1k.bin")), (200, 200), heads=(False, True)),
    Case("more-upgrade-with-body-pipelined", r(G.format(S), *UPGRADE_WS, "Content-Length: 3",
                                               body=b"abc") + r(G.format(S)),
         (200, 200), heads=(False, False)),
    Case("more-upgrade-after-get", r(G.format(S)) + r(G.format(S), *UPGRADE_WS) + r(G.format(S)),
         (200, 200, 200), heads=(False, False, False)),
    Case("more-upgrade-close", r(G.format(S), "Connection: Upgrade, close", "Upgrade: websocket"),
         (200,)),
    Case("more-te-chunked-upper", r(G.format(S), "Transfer-Encoding: CHUNKED",
                                    body=b"0\r\n\r\n"), (200,)),
]


def build_more_docroot(base: Path) -> Path:
    """test_nginx_parity's docroot with the folders and media types these cases ask for."""
    root = build_docroot(base)
    for name in EXTRA_DIRS:
        add_file(root, f"{name}/index.html", b"<p>in a folder</p>\n")
    for name, data in EXTRA_FILES.items():
        add_file(root, name, data)
    return root


@pytest.fixture(scope="module")
def docroot() -> Iterator[Path]:
    with temporary_docroot("parity-more-", build_more_docroot) as root:
        yield root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_nginx_more(case: Case, nginx: int, ours: tuple[str, int]):  # noqa: F811
    assert_like_nginx(case, nginx, ours, persistence=True)


@pytest.mark.parametrize(("target", "location"), [
    ("///sub?x=1", "/sub/?x=1"),
    ("//sub", "/sub/"),
    ("/./sub/../sub", "/sub/"),
    ("/s%75b", "/sub/"),
    ("/sp%20ace", "/sp%20ace/"),
    ("/%C3%BCn%C3%AF?q", "/%C3%BCn%C3%AF/?q"),
    ("/q%3Fx", "/q%3Fx/"),
    ("/h%23x", "/h%23x/"),
    ("/pc%2541", "/pc%2541/"),
    ("/a+b", "/a+b/"),
])
def test_folder_location_exact(ours: tuple[str, int], target: str, location: str):  # noqa: F811
    """The Location as sent (the comparison above sees only its path as urlsplit reads it, and
    urlsplit reads "///sub/" as the path "/sub/" with an empty host)."""
    _, port = ours
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(r(G.format(target), "Connection: close"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    assert head[0].startswith("HTTP/1.1 301 ")
    assert f"Location: {location}" in head[1:]
