"""Request targets, file names, methods and media types against nginx, on both answer paths.

Same machinery as test_nginx_parity.py (its docroot, servers, `observe` and comparison): each
case is sent raw to nginx and to this server with (`fsctl up`) and without (`fsctl up -n`) the
kernel fast path, and what a client can rely on must match. Files with odd names (and odd
kinds: a FIFO, symlink loops, an index.html that is a folder) are added to the docroot. Case
ids start with "paths-" so that they never meet the other modules' cached observations.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fileserver_ctl import response

from test_nginx_parity import (G, H, MTIME, READ_TIMEOUT, Case, Reader,  # noqa: F401
                               assert_like_nginx, build_docroot, nginx, ours, r,  # fixtures
                               temporary_docroot)

LONG = "n" * 255  # NAME_MAX
EXTRA_FILES = {  # name (bytes: not UTF-8) -> content
    "a+b.txt": b"plus\n",
    "semi;colon.txt": b"semicolon\n",
    "pct%41.txt": b"a literal percent sign\n",
    "q?x.txt": b"question mark\n",
    "h#x.txt": b"hash\n",
    b"caf\xe9.txt": b"latin-1 name\n",
    "back\\slash.txt": b"backslash\n",
    "dot.": b"trailing dot\n",
    "three...dots": b"dots inside\n",
    LONG: b"a name of 255 bytes\n",
    "sub/deeper/leaf.txt": b"leaf\n",
    "idxdir/index.html/inner.txt": b"index.html is a folder\n",
    "README": b"no extension\n",
    "Page.HTML": b"<p>upper html</p>\n",
    "pic.PNG": b"\x89PNG\r\n\x1a\n",
    "app.min.js": b"1;\n",
    "data.json.gz": b"\x1f\x8b json",
    "img.svgz": b"\x1f\x8b svg",
    "mod.mjs": b"export {};\n",
    "dir.d/file": b"a dot in the folder's name only\n",
    "Archive.TAR.GZ": b"\x1f\x8b upper",
}
EXTRA_DIRS = ['a"b', "a<b>", "brack[1]", "x^`{|}", "pct%zz", "tab\tname", "nl\nname", "cr\rname",
              b"caf\xe9"]


def _name(name: str | bytes) -> str:
    return os.fsdecode(name) if isinstance(name, bytes) else name


S = "/small.txt"
WHY_REG_NAME = "RFC 9112 §3.2.2: a server MUST accept the absolute-form; this reg-name is valid"
WHY_SCHEME = ("RFC 3986 §3.1 allows digits, '+', '-', '.' in a scheme, llhttp does not: 400; "
              "no scheme but http(s) names a resource of an origin server (RFC 9110 §4.2)")
CASES = [
    # --- targets: percent-encoding ---
    Case("paths-pct-lower-hex", r(G.format("/%c3%bcn%c3%afc%c3%b6d%c3%a9%20%e2%82%ac.txt")),
         (200,)),
    Case("paths-pct-plus-name", r(G.format("/a+b.txt")), (200,)),
    Case("paths-pct-encoded-plus", r(G.format("/a%2Bb.txt")), (200,)),
    Case("paths-plus-is-not-space", r(G.format("/space+name.txt")), (404,)),
    Case("paths-semicolon", r(G.format("/semi;colon.txt")), (200,)),
    Case("paths-semicolon-param", r(G.format("/small.txt;x=1")), (404,)),
    Case("paths-literal-percent-name", r(G.format("/pct%2541.txt")), (200,)),
    Case("paths-encoded-question", r(G.format("/q%3Fx.txt")), (200,)),
    Case("paths-encoded-question-lower", r(G.format("/q%3fx.txt")), (200,)),
    Case("paths-encoded-hash", r(G.format("/h%23x.txt")), (200,)),
    Case("paths-latin1-encoded", r(G.format("/caf%E9.txt")), (200,)),
    Case("paths-latin1-raw", r(G.format("/caf\u00e9.txt")), (404,)),
    Case("paths-pct-half", r(G.format("/small%2.txt")), (400,)),
    Case("paths-pct-nul-end", r(G.format("/small.txt%00")), (400,), ours=(404,), compare=False,
         why="issue 3 (owners): a NUL byte in the path is 404, telling nothing"),
    Case("paths-pct-slash-dotdot", r(G.format("/sub/..%2Fsmall.txt")), (200,)),
    Case("paths-pct-all-dotdot", r(G.format("/sub%2F%2E%2E%2Fsmall.txt")), (200,)),
    Case("paths-pct-dot-end", r(G.format("/sub/%2E")), (200,)),
    Case("paths-pct-dotdot-end", r(G.format("/sub/%2E%2E")), (200,)),
    Case("paths-pct-invalid-in-query", r(G.format("/small.txt?%zz")), (200,)),
    Case("paths-pct-invalid-after-hash", r(G.format("/small.txt#%zz")), (200,)),
    Case("paths-pct-backslash", r(G.format("/back%5Cslash.txt")), (200,)),
    Case("paths-backslash-raw", r(G.format("/back\\slash.txt")), (200,)),
    Case("paths-backslash-dotdot", r(G.format("/sub\\..\\small.txt")), (404,)),
    # --- targets: dot segments, slashes ---
    Case("paths-dot-end", r(G.format("/sub/.")), (200,)),
    Case("paths-dotdot-end", r(G.format("/sub/..")), (200,)),
    Case("paths-dot-root", r(G.format("/.")), (200,)),
    Case("paths-dot-slash-root", r(G.format("/./")), (200,)),
    Case("paths-file-dot", r(G.format("/small.txt/.")), (404,)),
    Case("paths-file-dotdot", r(G.format("/sub/page.txt/..")), (200,)),
    Case("paths-file-dotdot-file", r(G.format("/sub/page.txt/../page.txt")), (200,)),
    Case("paths-missing-dotdot", r(G.format("/nope/../small.txt")), (200,)),
    Case("paths-deep-dotdot", r(G.format("/sub/deeper/../../small.txt")), (200,)),
    Case("paths-dotdot-to-root-dir", r(G.format("/sub/..")), (200,)),
    Case("paths-slash-run-inside", r(G.format("/sub//page.txt")), (200,)),
    Case("paths-slash-run-end", r(G.format("/sub//")), (200,)),
    Case("paths-slash-run-root", r(G.format("///")), (200,)),
    Case("paths-slash-dotdot", r(G.format("/sub//../small.txt")), (200,)),
    Case("paths-trailing-dot-name", r(G.format("/dot.")), (200,)),
    Case("paths-trailing-dot-file", r(G.format("/small.txt.")), (404,)),
    Case("paths-three-dots", r(G.format("/three...dots")), (200,)),
    Case("paths-three-dots-segment", r(G.format("/.../small.txt")), (404,)),
    Case("paths-case-differs", r(G.format("/SMALL.TXT")), (404,)),
    Case("paths-long-name", r(G.format("/" + LONG)), (200,)),
    Case("paths-too-long-name", r(G.format("/" + LONG + "n")), (404,)),
    Case("paths-too-long-path", r(G.format("/a" * 2100)), (404,)),
    # --- targets: query, fragment, forms ---
    Case("paths-query-dir-slash", r(G.format("/sub/?a=1&b=2")), (200,)),
    Case("paths-fragment-dir", r(G.format("/sub#frag")), (301,)),
    Case("paths-query-fragment-dir", r(G.format("/sub?x=1#frag")), (301,)),
    Case("paths-query-slash-dir", r(G.format("/sub?a/b")), (301,)),
    Case("paths-absolute-dir-query", r(G.format("http://localhost/sub?x=1")), (301,)),
    Case("paths-absolute-dir", r(G.format("http://localhost/sub")), (301,)),
    Case("paths-absolute-port", r(G.format("http://localhost:80/small.txt")), (200,)),
    Case("paths-absolute-other-port", r(G.format("http://other.example:8080/small.txt")), (200,)),
    Case("paths-absolute-ipv6", r(G.format("http://[::1]/small.txt")), (200,)),
    Case("paths-absolute-ftp", r(G.format("ftp://localhost/small.txt")), (200,)),
    Case("paths-absolute-query-only", r(G.format("http://localhost?x=1")), (200,)),
    Case("paths-absolute-bad-port", r(G.format("http://localhost:ab/small.txt")), (400,)),
    Case("paths-absolute-one-slash", r(G.format("http:/small.txt")), (400,)),
    Case("paths-absolute-empty-host", r(G.format("http:///small.txt")), (400,)),
    Case("paths-absolute-dotdot", r(G.format("http://localhost/sub/../small.txt")), (200,)),
    Case("paths-absolute-pct", r(G.format("http://localhost/sm%61ll.txt")), (200,)),
    Case("paths-absolute-empty-port", r(G.format("http://localhost:/small.txt")), (200,)),
    Case("paths-absolute-two-ports", r(G.format("http://localhost:1:2/small.txt")), (400,)),
    # (compare=False below: a 400 closes the connection, a 200 keeps it)
    # nginx's request line takes only letters, digits, '.' and '-' in a reg-name; RFC 3986
    # §3.2.2 allows unreserved, sub-delims and pct-encoded, and RFC 9112 §3.2.2 says a server
    # MUST accept the absolute-form: taken (RFC 9110 §7.2 Host values are as lenient in nginx)
    Case("paths-absolute-underscore", r(G.format("http://loc_al/small.txt")), (400,),
         compare=False, ours=(200,), why=WHY_REG_NAME),
    Case("paths-absolute-tilde", r(G.format("http://a~b/small.txt")), (400,), compare=False,
         ours=(200,),
         why=WHY_REG_NAME),
    Case("paths-absolute-sub-delims", r(G.format("http://a!b$c*d/small.txt")), (400,),
         compare=False, ours=(200,), why=WHY_REG_NAME),
    Case("paths-absolute-pct-host", r(G.format("http://loc%61lhost/small.txt")), (400,),
         compare=False, ours=(200,), why=WHY_REG_NAME),
    Case("paths-absolute-bad-literal", r(G.format("http://[zz]/small.txt")), (200,),
         compare=False, ours=(400,),
         why="RFC 3986 §3.2.2: an IP-literal holds an IPv6 address or IPvFuture; RFC 9112 §3.2: "
         "an invalid request-target is 400 (nginx takes any letters in brackets)"),
    # left as they are: llhttp refuses them, nginx does not
    Case("paths-absolute-digit-scheme", r(G.format("h1tp://localhost/small.txt")), (200,),
         compare=False, ours=(400,), why=WHY_SCHEME),
    Case("paths-absolute-plus-scheme", r(G.format("http+x://localhost/small.txt")), (200,),
         compare=False, ours=(400,), why=WHY_SCHEME),
    Case("paths-absolute-port-over-65535", r(G.format("http://localhost:99999/small.txt")),
         (200,), compare=False, ours=(400,),
         why="no TCP port is above 65535: llhttp (yarl) refuses the target; nginx ignores it"),
    Case("paths-absolute-trailing-dot", r(G.format("http://localhost./small.txt")), (200,)),
    Case("paths-absolute-dotdot-host", r(G.format("http://local..host/small.txt")), (400,)),
    Case("paths-absolute-double-slash", r(G.format("http://localhost//small.txt")), (200,)),
    Case("paths-absolute-dot-dir", r(G.format("http://localhost/./sub")), (301,)),
    Case("paths-absolute-escape-root", r(G.format("http://localhost/%2e%2e/x")), (400,),
         ours=(404,), compare=False,
         why="issue 3 (owners): a path leaving the docroot is 404, telling nothing"),
    Case("paths-absolute-no-scheme", r(G.format("//localhost/small.txt")), (404,)),
    Case("paths-query-only", r(G.format("?x=1")), (400,)),
    Case("paths-authority-get", r(G.format("localhost:80")), (400,)),
    Case("paths-asterisk-head", r(H.format("*")), (400,)),
    # --- files ---
    # nginx's open() fails with ELOOP: 403
    Case("paths-symlink-loop", r(G.format("/loop")), (403,)),
    Case("paths-head-symlink-loop", r(H.format("/loop")), (403,)),
    Case("paths-symlink-loop-slash", r(G.format("/loop/")), (403,)),
    Case("paths-symlink-loop-below", r(G.format("/loop/x.txt")), (403,)),
    Case("paths-symlink-loop-index", r(G.format("/loopidx/")), (403,)),
    Case("paths-symlink-loop-index-file", r(G.format("/loopidx/index.html")), (403,)),
    Case("paths-symlink-dangling", r(G.format("/dangling")), (404,)),
    Case("paths-symlink-dir", r(G.format("/linkdir/page.txt")), (200,)),
    Case("paths-symlink-dir-index", r(G.format("/linkdir/")), (200,)),
    Case("paths-symlink-dir-no-slash", r(G.format("/linkdir")), (301,)),
    Case("paths-fifo", r(G.format("/fifo")), (404,)),
    Case("paths-head-fifo", r(H.format("/fifo")), (404,)),
    # an index.html that is a folder: nginx's index module hands the request to it, and
    # the folder's URL is given its slash
    Case("paths-index-is-dir", r(G.format("/idxdir/")), (301,)),
    Case("paths-index-is-dir-query", r(G.format("/idxdir/?a=1")), (301,)),
    Case("paths-head-index-is-dir", r(H.format("/idxdir/")), (301,)),
    Case("paths-index-is-dir-itself", r(G.format("/idxdir/index.html")), (301,)),
    Case("paths-index-is-dir-inner", r(G.format("/idxdir/index.html/inner.txt")), (200,)),
    Case("paths-overlong-utf8-dotdot", r(G.format("/%C0%AE%C0%AE/small.txt")), (404,)),
    Case("paths-invalid-utf8", r(G.format("/small%FF.txt")), (404,)),
    Case("paths-pct-slash-dir", r(G.format("/sub%2F")), (200,)),
    Case("paths-pct-slash-dir-redirect", r(G.format("/sub%2Fdeeper")), (301,)),
    Case("paths-head-empty", r(H.format("/empty.txt")), (200,)),
    # a hidden name removed by a following ".." leaves no hidden name in the path served
    Case("paths-hidden-then-dotdot", r(G.format("/.hidden/../small.txt")), (200,)),
    Case("paths-hidden-dir-then-dotdot", r(G.format("/sub/.git/../page.txt")), (200,)),
    Case("paths-pct-hidden-then-dotdot", r(G.format("/%2Egit/%2E%2E/sub/")), (200,)),
    Case("paths-hidden-then-dotdot-redirect", r(G.format("/.x/../sub?q")), (301,)),
    Case("paths-hidden-dir-file", r(G.format("/.git/config")), (200,), ours=(404,),
         compare=False, why="dot files are never served, nor what is under a dot folder"),
    # Location of a folder whose name needs escaping
    Case("paths-redirect-quote", r(G.format("/a%22b")), (301,)),
    Case("paths-redirect-angle", r(G.format("/a%3Cb%3E")), (301,)),
    Case("paths-redirect-brackets", r(G.format("/brack%5B1%5D")), (301,), ours=(301,),
         compare=False, why="RFC 3986 §3.3: '[' and ']' may not stand in a path; nginx's "
         "Location has them unescaped, ours /brack%5B1%5D/ (test_folder_location_like_nginx)"),
    Case("paths-redirect-others", r(G.format("/x%5E%60%7B%7C%7D")), (301,)),
    Case("paths-redirect-pct-zz", r(G.format("/pct%25zz")), (301,)),
    Case("paths-redirect-tab", r(G.format("/tab%09name")), (301,)),
    Case("paths-redirect-latin1", r(G.format("/caf%E9")), (301,)),
    Case("paths-redirect-newline", r(G.format("/nl%0Aname")), (301,)),
    Case("paths-redirect-cr", r(G.format("/cr%0dname?x")), (301,)),
    # --- methods ---
    Case("paths-options-dir", r("OPTIONS /sub/ HTTP/1.1"), (405,)),
    Case("paths-options-missing", r("OPTIONS /missing HTTP/1.1"), (405,)),
    Case("paths-delete-missing", r("DELETE /missing HTTP/1.1"), (405,)),
    Case("paths-delete-dir", r("DELETE /sub/ HTTP/1.1"), (405,)),
    Case("paths-put-pipelined", r("PUT /new.txt HTTP/1.1", "Content-Length: 3", body=b"abc")
         + r(G.format(S)), (405, 200), heads=(False, False)),
    Case("paths-post-dir-no-slash", r("POST /sub HTTP/1.1", "Content-Length: 0"), (301,),
         ours=(405,), why="the method is refused before the path is looked up: GET/HEAD only"),
    Case("paths-post-dir", r("POST /sub/ HTTP/1.1", "Content-Length: 0"), (405,)),
    Case("paths-patch-missing", r("PATCH /missing HTTP/1.1", "Content-Length: 0"), (405,)),
    Case("paths-trace-dir", r("TRACE /sub/ HTTP/1.1"), (405,)),
    Case("paths-connect-authority", r("CONNECT localhost:443 HTTP/1.1"), (400,), ours=(405,),
         why="RFC 9110 §9.3.6: CONNECT to an authority is a valid request an origin server "
         "need not implement; 405 with Allow says so (nginx cannot parse the form: 400)"),
    Case("paths-connect-ipv6", r("CONNECT [::1]:443 HTTP/1.1"), (400,), ours=(405,),
         why="RFC 9110 §9.3.6: as paths-connect-authority"),
    Case("paths-connect-http10", r("CONNECT localhost:443 HTTP/1.0", host=None), (400,),
         ours=(405,), why="RFC 9110 §9.3.6: as paths-connect-authority"),
    # (nginx closes after its 400; after a 405 the connection goes on)
    Case("paths-delete-nul", r("DELETE /small.txt%00 HTTP/1.1"), (400,), ours=(405,),
         compare=False,
         why="the method is refused before the path is decoded (a GET of it is 404, issue 3)"),
    Case("paths-options-dotdot-escape", r("OPTIONS /%2e%2e/x HTTP/1.1"), (400,), ours=(405,),
         compare=False,
         why="the method is refused before the path is decoded (a GET of it is 404, issue 3)"),
    Case("paths-delete-bad-escape", r("DELETE /small%zz.txt HTTP/1.1"), (400,)),
    Case("paths-put-expect-then-body", r("PUT /new.txt HTTP/1.1", "Expect: 100-continue",
                                         "Content-Length: 5", body=b"hello") + r(G.format(S)),
         (405, 200), heads=(False, False)),
    Case("paths-options-absolute", r("OPTIONS http://localhost HTTP/1.1"), (405,)),
    Case("paths-connect-path", r("CONNECT /small.txt HTTP/1.1"), (405,)),
    Case("paths-lower-head", r("head /small.txt HTTP/1.1"), (400,)),
    Case("paths-lower-options", r("options /small.txt HTTP/1.1"), (400,)),
    Case("paths-mixed-get", r("Get /small.txt HTTP/1.1"), (400,)),
    Case("paths-head-redirect-query", r(H.format("/sub?x=1")), (301,)),
    Case("paths-head-bad-escape", r(H.format("/small%zz.txt")), (400,)),
    Case("paths-head-too-long-name", r(H.format("/" + LONG + "n")), (404,)),
    Case("paths-options-pipelined", r("OPTIONS /small.txt HTTP/1.1") + r(H.format(S)),
         (405, 200), heads=(False, True)),
    Case("paths-delete-body-pipelined", r("DELETE /small.txt HTTP/1.1", "Content-Length: 2",
                                          body=b"xy") + r(G.format(S)), (405, 200),
         heads=(False, False)),
    # --- media types ---
    Case("paths-type-readme", r(G.format("/README")), (200,)),
    Case("paths-type-upper-html", r(G.format("/Page.HTML")), (200,)),
    Case("paths-type-upper-png", r(G.format("/pic.PNG")), (200,)),
    Case("paths-type-min-js", r(G.format("/app.min.js")), (200,), ours_type="text/javascript",
         why="RFC 9239 §6: text/javascript; application/javascript is obsolete"),
    Case("paths-type-json-gz", r(G.format("/data.json.gz")), (200,), ours_type="application/gzip",
         why="mimetypes knows RFC 6713's application/gzip; nginx's mime.types lacks .gz"),
    Case("paths-type-svgz", r(G.format("/img.svgz")), (200,), ours_type="application/gzip",
         why="RFC 6713: the bytes are a gzip stream; as image/svg+xml (nginx), without "
         "Content-Encoding, they are not the SVG the type names"),
    Case("paths-type-dot-end", r(G.format("/dot.")), (200,)),
    Case("paths-type-mjs", r(G.format("/mod.mjs")), (200,), ours_type="text/javascript",
         why="RFC 9239 §6 registers .mjs for text/javascript; nginx 1.22's mime.types lacks it "
         "(application/octet-stream: browsers refuse to run such a module script)"),
    Case("paths-type-dot-in-folder", r(G.format("/dir.d/file")), (200,)),
    Case("paths-type-upper-tar-gz", r(G.format("/Archive.TAR.GZ")), (200,),
         ours_type="application/gzip",
         why="mimetypes knows RFC 6713's application/gzip; nginx's mime.types lacks .gz"),
    Case("paths-type-index-sub", r(G.format("/sub/?x")), (200,)),
]


def build_paths_docroot(base: Path) -> Path:
    """test_nginx_parity's docroot with the names and kinds of file these cases ask for."""
    root = build_docroot(base)
    for name, data in EXTRA_FILES.items():
        path = root / _name(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    for name in EXTRA_DIRS:
        (root / _name(name)).mkdir()
        (root / _name(name) / "index.html").write_bytes(b"<p>in a folder</p>\n")
    (root / "loop").symlink_to("loop")
    (root / "dangling").symlink_to("nowhere")
    (root / "linkdir").symlink_to("sub")
    (root / "loopidx").mkdir()
    (root / "loopidx" / "index.html").symlink_to("index.html")
    os.mkfifo(root / "fifo")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"[core]\n")
    for path in [*root.rglob("*"), root]:
        if path.is_symlink() or "unreadable.txt" == path.name or "private" in path.parts:
            continue
        path.chmod(0o755 if path.is_dir() else 0o644)
        os.utime(path, (MTIME, MTIME))
    return root

# Extensions nginx's mime.types names where the system's table (/etc/mime.types, which
# mimetypes reads) names another type or none: nginx's is sent, no RFC prefers the other
NGINX_TYPES = ["asf", "bmp", "cco", "deb", "dll", "dmg", "exe", "ico", "iso", "jardiff", "m4a",
               "m4v", "mml", "msi", "msm", "pdb", "pem", "pl", "pm", "prc", "ra", "rar", "run",
               "sea", "swf", "tcl", "tk", "EXE", "Pl"]
CASES += [Case(f"paths-type-{ext}", r(G.format(f"/t.{ext}")), (200,)) for ext in NGINX_TYPES]
EXTRA_FILES.update({f"t.{ext}": ext.encode() for ext in NGINX_TYPES})
# where this server sends another type than nginx's mime.types names, on purpose
KEPT_TYPES = {"js": "text/javascript", "xml": "application/xml", "svgz": "application/gzip"}


def test_media_types_are_nginx_types():
    """Every extension of nginx's mime.types gets nginx's type (the servers above are asked
    for a sample), but for KEPT_TYPES (see their cases and test_nginx_parity's type-js)."""
    table = Path("/etc/nginx/mime.types")
    if not table.exists():
        pytest.skip("nginx's mime.types is not installed")
    text = table.read_text()
    types = {}
    for statement in text[text.index("{") + 1:text.rindex("}")].split(";"):
        words = statement.split()
        for ext in words[1:]:
            types[ext] = words[0]
    assert len(types) > 100
    got = {ext: response.content_type(f"name.{ext}").split(";")[0] for ext in types}
    assert got == {ext: KEPT_TYPES.get(ext, t) for ext, t in types.items()}


@pytest.fixture(scope="module")
def docroot() -> Iterator[Path]:
    with temporary_docroot("parity-paths-", build_paths_docroot) as root:
        yield root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_nginx_paths(case: Case, nginx: int, ours: tuple[str, int]):  # noqa: F811
    assert_like_nginx(case, nginx, ours, persistence=True)


# Folders whose Location the comparison above cannot tell apart (urlsplit drops a fragment and an
# empty query), and the whole value of the rest: ours as nginx's without its scheme and host
LOCATIONS = [
    "/sub#frag", "/sub?x=1#frag", "/sub?", "/sub?#x", "/s%75b#f?x", "http://localhost/sub?x=1",
    "http://localhost/sub?x=1#f", "http://localhost:80/sub?", "/sub?a/b?c",
    "/a%22b", "/a%3Cb%3E?<>", "/x%5E%60%7B%7C%7D", "/tab%09name", "/nl%0Aname", "/cr%0Dname",
    "/caf%e9", "/sub%2Fdeeper?q", "/pct%25zz", "/linkdir", "/idxdir/?a=1#b", "/idxdir/",
]
# where ours differs on purpose: RFC 3986 §3.3 has no '[' or ']' in a path, nor a '\\'
LOCATIONS_OURS = {"/brack%5B1%5D?x": "/brack%5B1%5D/?x"}


def _location(port: int, target: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(r(G.format(target), "Connection: close"))
        status, headers, _ = Reader(sock).answer(False)
    assert status == 301
    return headers["location"][-1]


_nginx_locations: dict[str, str] = {}


@pytest.mark.parametrize("target", [*LOCATIONS, *LOCATIONS_OURS])
def test_folder_location_like_nginx(nginx: int, ours: tuple[str, int], target: str):  # noqa: F811
    if target not in _nginx_locations:
        _nginx_locations[target] = _location(nginx, target)
    reference = _nginx_locations[target]
    assert reference.startswith("http://"), "nginx changed"
    reference = "/" + reference.split("/", 3)[3]
    got = _location(ours[1], target)
    assert got == LOCATIONS_OURS.get(target, reference)


def _get(port: int, target: str) -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.sendall(r(G.format(target), "Connection: close"))
        return Reader(sock).answer(False)


def test_a_name_that_changes_kind(ours: tuple[str, int], docroot: Path):  # noqa: F811
    """One name turned into a file of other bytes, a folder, a FIFO, a symlink loop, nothing and
    a file again, each answered as nginx answers that kind (see the cases above), the change
    seen by the very next request, on a name the kernel cache held (the answer is asked for
    twice, a moment apart, so that it can be cached before the next change)."""
    _, port = ours
    path = docroot / "morph"

    def clear() -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()

    def file(data: bytes) -> None:
        clear()
        path.write_bytes(data)
        path.chmod(0o644)

    def folder() -> None:
        clear()
        path.mkdir()
        (path / "index.html").write_bytes(b"<p>now a folder</p>\n")
        path.chmod(0o755)
        (path / "index.html").chmod(0o644)

    def fifo() -> None:
        clear()
        os.mkfifo(path)

    def loop() -> None:
        clear()
        path.symlink_to("morph")

    steps = [(lambda: file(b"one\n"), 200, b"one\n"), (lambda: file(b"two, longer\n"), 200,
             b"two, longer\n"), (folder, 301, None), (fifo, 404, None), (loop, 403, None),
             (clear, 404, None), (lambda: file(b"back\n"), 200, b"back\n")]
    try:
        for make, status, body in steps:
            make()
            for _ in range(2):
                got, _, data = _get(port, "/morph")
                assert got == status, make
                if body is not None:
                    assert data == body
                time.sleep(0.3)
        assert _get(port, "/morph/")[0] == 404
    finally:
        clear()
