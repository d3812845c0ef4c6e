"""Pure RFC 9110 decisions for a static file: request-target to path, preconditions, ranges, codings.

Nothing here touches the file system or the network, so every rule is tested with plain values.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from functools import lru_cache
from urllib.parse import unquote_to_bytes

# --- request-target -> path segments (RFC 9112 §3.2, RFC 3986 §5.2.4) ------------------------


def target_path(target: str) -> str:
    """The path part of an origin-form or absolute-form request-target (query and fragment cut)."""
    if not target.startswith("/"):
        scheme_end = target.find("://")
        if scheme_end < 0:
            return ""
        slash = target.find("/", scheme_end + 3)
        target = "/" if slash < 0 else target[slash:]
    for sep in ("?", "#"):
        cut = target.find(sep)
        if cut >= 0:
            target = target[:cut]
    return target


def target_query(target: str) -> str:
    """The query of a request-target with its "?", as a redirect carries it on: "" when there is
    none or it is empty, and never a fragment (no part of a request-target, RFC 9112 §3.2; a
    client sending one has it cut, as nginx cuts it). Any target form (origin or absolute)."""
    cut = target.find("#")
    if cut >= 0:
        target = target[:cut]
    start = target.find("?")
    return "" if start < 0 or start == len(target) - 1 else target[start:]


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def escapes_valid(path: str) -> bool:
    """Every "%" starts a pct-encoded octet (RFC 3986 §2.1); else the target is invalid: 400."""
    return _BAD_ESCAPE.search(path) is None


def target_authority(target: str) -> str | None:
    """The authority of an absolute-form request-target (RFC 9112 §3.2.2), None for other forms."""
    scheme_end = target.find("://")
    if target.startswith("/") or scheme_end < 0:
        return None
    rest = target[scheme_end + 3:]
    for sep in ("/", "?", "#"):
        cut = rest.find(sep)
        if cut >= 0:
            rest = rest[:cut]
    return rest


@lru_cache(maxsize=1024)
def valid_host(host: str) -> bool:
    """Whether a Host value (or absolute-form authority) names a host, as nginx checks it.

    RFC 9110 §7.2 wants 400 for a Host with an invalid value. This follows nginx's lenient
    reading of uri-host [":" port]: a host part that is not empty once a trailing dot is
    dropped, no "..", no "/", no control byte or space; anything after ":" (or after an
    IP-literal's "]") is the port and not checked further.
    """
    host_len = len(host)
    dot = -2
    in_literal = in_port = False
    for i, ch in enumerate(host):
        if ch == ".":
            if dot == i - 1:
                return False
            dot = i
        elif ch == ":":
            if not in_literal and not in_port:
                host_len, in_port = i, True
        elif ch == "[":
            if i == 0:
                in_literal = True
        elif ch == "]":
            if in_literal:
                host_len, in_literal, in_port = i + 1, False, True
        elif ch == "/" or ch <= " " or ch == "\x7f":
            return False
    if dot == host_len - 1:
        host_len -= 1
    return host_len > 0


@lru_cache(maxsize=4096)
def path_segments(path: str) -> tuple[tuple[str, ...], bool] | None:
    """Decoded, dot-segment-free segments of a request path, and whether it ends with a slash.

    None when the path must be answered with 404: a NUL byte, a climb above the docroot, or a
    hidden name (a segment starting with ".") left once the dot segments are removed ("/.x/../a"
    is "/a", as nginx reads it: nothing hidden is named). Percent-escapes are decoded as UTF-8; bytes that
    are not UTF-8 survive as surrogates so they still map to the same file name on disk.
    Empty segments ("//") are merged, as nginx does.
    """
    if not path.startswith("/"):
        return None
    decoded = unquote_to_bytes(path).decode("utf-8", "surrogateescape")
    if "\x00" in decoded:
        return None
    raw = decoded.split("/")
    out: list[str] = []
    for seg in raw:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if not out:
                return None
            out.pop()
            continue
        out.append(seg)
    if any(seg[0] == "." for seg in out):
        return None
    trailing = raw[-1] in ("", ".", "..")
    return tuple(out), trailing


def has_close_option(values) -> bool:
    """Whether Connection field values list "close" (RFC 9112 §9.6); llhttp lets an HTTP/1.0
    "keep-alive" win over it, RFC 9112 §9.3 says close wins."""
    return has_connection_option(values, "close")


def has_connection_option(values, option: str) -> bool:
    """Whether Connection field values list `option` (lower case), e.g. "keep-alive"."""
    return any(token.strip(" \t").lower() == option for value in values
               for token in value.split(","))


# --- validators (RFC 9110 §8.8, §13) ---------------------------------------------------------

_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


@lru_cache(maxsize=1024)
def parse_etags(value: str) -> tuple[tuple[bool, str], ...] | None:
    """An If-Match / If-None-Match list as (weak, opaque-tag) pairs; () for "*"; None if malformed."""
    value = value.strip()
    if value == "*":
        return ()
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        if value[pos] in " \t,":  # empty list elements are allowed (RFC 9110 §5.6.1)
            pos += 1
            continue
        m = _ETAG.match(value, pos)
        if m is None:
            return None
        tags.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return tuple(tags) if tags else None


_MONTHS = {name: i for i, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}
_MONTH = "(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(\d\d):(\d\d):(\d\d)"
# The three formats of RFC 9110 §5.6.7, case-sensitive, as nginx reads them: the day name is
# not checked (nginx skips it), spaces may follow its comma, and what follows the time (the
# year in asctime) is not read ("GMT"; old browsers append "; length=N"), unless it is a
# numeric zone other than GMT's or another list member. Two-digit days and hours, four-digit
# years but RFC 850's two.
_IMF_FIXDATE = re.compile(rf"[^, ]*, *(\d\d) {_MONTH} (\d{{4}}) {_TIME}(.*)", re.S)
_RFC850_DATE = re.compile(rf"[^, ]*, *(\d\d)-{_MONTH}-(\d\d) {_TIME}(.*)", re.S)
_ASCTIME_DATE = re.compile(rf"[^, ]* +{_MONTH}  ?(\d\d?) {_TIME} (\d{{4}})(.*)", re.S)
_OTHER_ZONE = re.compile(r" *[+-](?!0000)\d{4}")


@lru_cache(maxsize=256)
def _http_date_fields(value: str) -> tuple[int, bool, int, int, int, int, int] | None:
    """(year, whether it has two digits, month, day, hour, minute, second) of an HTTP-date."""
    m = _IMF_FIXDATE.match(value) or _RFC850_DATE.match(value)
    if m is not None:
        day, month, year, hour, minute, second, rest = m.groups()
        if _OTHER_ZONE.match(rest):
            return None  # a time of another zone is not the time written
    else:
        m = _ASCTIME_DATE.match(value)
        if m is None:
            return None
        month, day, hour, minute, second, year, rest = m.groups()
    if "," in rest:
        return None  # a list of dates is none (RFC 9110 §13.1.3, §13.1.4)
    return (int(year), len(year) == 2, _MONTHS[month], int(day), int(hour), int(minute),
            int(second))


def parse_http_date(value: str, now: float | None = None) -> int | None:
    """Seconds since the epoch of an HTTP-date (IMF-fixdate, RFC 850 or asctime), None if invalid.

    RFC 850's two-digit year is the most recent year with those digits that is not more than
    50 years after `now`'s, as RFC 9110 §5.6.7 wants.
    """
    fields = _http_date_fields(value)
    if fields is None:
        return None
    year, two_digits, month, day, hour, minute, second = fields
    if two_digits:
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year += this_year - this_year % 100
        if year > this_year + 50:
            year -= 100
    try:
        stamp = datetime(year, month, day, hour, minute, second)  # rejects day 32, hour 25...
    except ValueError:
        return None
    return int((stamp - datetime(1970, 1, 1)).total_seconds())


def etag_matches(value: str, etag: str, *, weak: bool) -> bool:
    """Whether a list of entity-tags matches `etag` (strong comparison unless `weak`)."""
    tags = parse_etags(value)
    if tags is None:
        return False
    if tags == ():
        return True  # "*": the representation exists
    return any(opaque == etag and (weak or not is_weak) for is_weak, opaque in tags)


def precondition_status(headers, etag: str, last_modified: int, *, is_get_or_head: bool) -> int:
    """RFC 9110 §13.2.2: 412, 304 or 200 (go on), evaluating the conditionals in their order.

    `headers` is any mapping with .get() (case-insensitive names); `last_modified` is whole
    seconds, as sent in Last-Modified.
    """
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not etag_matches(if_match, etag, weak=False):
            return 412
    else:
        ius = headers.get("If-Unmodified-Since")
        if ius is not None:
            date = parse_http_date(ius)
            if date is not None and last_modified > date:
                return 412
    inm = headers.get("If-None-Match")
    if inm is not None:
        if etag_matches(inm, etag, weak=True):
            return 304 if is_get_or_head else 412
    elif is_get_or_head:
        ims = headers.get("If-Modified-Since")
        if ims is not None:
            date = parse_http_date(ims)
            if date is not None and last_modified <= date:
                return 304
    return 200


def if_range_allows(value: str, etag: str, last_modified: int) -> bool:
    """RFC 9110 §13.1.5: whether Range may apply; an entity-tag must match strongly, a date exactly."""
    value = value.strip()
    if value.startswith('"') or value.startswith("W/"):
        tags = parse_etags(value)
        return bool(tags) and len(tags) == 1 and not tags[0][0] and tags[0][1] == etag
    date = parse_http_date(value)
    return date is not None and date == last_modified


# --- ranges (RFC 9110 §14) --------------------------------------------------------------------

MAX_RANGES = 32  # more parts than this is abuse; the whole representation is sent instead
MAX_OFFSET = (1 << 63) - 1  # a position past any file offset (off_t): unsatisfiable, as in nginx
_FROM = re.compile(r" *(\d+) *- *(\d*) *")  # first-pos "-" [ last-pos ], spaces as nginx allows
_SUFFIX = re.compile(r" *-(\d+) *")  # "-" suffix-length


def parse_range(value: str, size: int) -> list[tuple[int, int]] | None:
    """Satisfiable byte ranges of a Range value as inclusive (first, last) pairs, clamped to size.

    None: ignore the header and send 200 (another unit, no range at all, too many parts, parts
    adding up to more than the file, or an empty file); []: 416. RFC 9110 §14.2 lets a server
    ignore or reject an invalid ranges-specifier; like nginx this one rejects it (416) unless the
    unit is not "bytes=", and takes empty list elements as the RFC's list syntax allows.
    """
    if len(value) < 7 or value[:6].lower() != "bytes=":
        return None
    ranges: list[tuple[int, int]] = []
    total = 0
    for spec in value[6:].split(","):
        if not spec.strip(" \t"):
            continue  # RFC 9110 §5.6.1: empty list elements are allowed
        m = _FROM.fullmatch(spec)
        if m is not None:
            first = int(m.group(1))
            last = int(m.group(2)) if m.group(2) else MAX_OFFSET
            end = min(last + 1, size)  # exclusive
        else:
            m = _SUFFIX.fullmatch(spec)
            if m is None:
                return []
            last = int(m.group(1))
            first = max(size - last, 0)
            end = size
        if first > MAX_OFFSET or last > MAX_OFFSET:
            return []
        if first < end:
            ranges.append((first, end - 1))
            total += end - first
        elif first == 0:
            return None  # an empty file: every range of it is the whole of it
    if not ranges:
        return []
    if len(ranges) > MAX_RANGES or total > size:
        return None  # overlapping parts would send more than the whole file
    return ranges


# --- content codings (RFC 9110 §12.5.3) -------------------------------------------------------

PRECOMPRESSED = (("br", ".br"), ("gzip", ".gz"))  # preference order on equal q


@lru_cache(maxsize=256)
def accepted_codings(value: str) -> dict[str, float]:
    """Accept-Encoding as coding -> q (lower-cased; "x-gzip" counts as gzip)."""
    out: dict[str, float] = {}
    for item in value.split(","):
        name, _, params = item.partition(";")
        name = name.strip().lower()
        if not name:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(val.strip())
                except ValueError:
                    q = 0.0
                if not 0.0 <= q <= 1.0:
                    q = 0.0
        if name == "x-gzip":
            name = "gzip"
        out[name] = q
    return out


def choose_coding(accept_encoding: str | None, available: tuple[str, ...]) -> str | None:
    """The precompressed coding to send (among `available`), or None for the identity file."""
    if not accept_encoding or not available:
        return None
    accepted = accepted_codings(accept_encoding)
    star = accepted.get("*", 0.0)
    best, best_q = None, 0.0
    for coding, _ in PRECOMPRESSED:
        if coding in available:
            q = accepted.get(coding, star)
            if q > best_q:
                best, best_q = coding, q
    return best
