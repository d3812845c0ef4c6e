"""Differential test of request sequences on one connection, across the kernel-to-user hand-off.

The kernel path answers the cached GET/HEAD requests of a connection it owns until the first one
it cannot answer, then hands the connection to the kernel's TCP stack and aiohttp answers the
rest. Per connection a seeded random sequence of 3-10 requests (hits of small to 200 KiB files,
304s, misses, ranges, bodies, HTTP/1.0, `Connection: close`), sent one at a time, two pipelined
in one write, split over two writes, or read slowly through a small receive buffer, goes to
`fsctl up` and to `fsctl up -n` on the same docroot (test_kernel_user_diff's pair of servers):
the whole byte stream of each connection, Date masked, and how it ends must be the same.

SEQ_CONNECTIONS (default 150), SEQ_SEED (default 9110) and SEQ_SECONDS (default 60) change the
run, e.g. `SEQ_CONNECTIONS=3000 SEQ_SECONDS=900 pytest tests/test_sequence_diff.py`.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from test_kernel_user_diff import (IPV6_EVERY, READ_TIMEOUT, SPLIT_PAUSE, Counters, Pair,
                                   Transcript, _etag_of, _sources, pair, r)

pytestmark = pytest.mark.bpf
__all__ = ["pair"]  # the module-scoped fixture, shared with test_kernel_user_diff

CONNECTIONS = int(os.environ.get("SEQ_CONNECTIONS", "150"))
SEED = int(os.environ.get("SEQ_SEED", "9110"))
TIME_BUDGET = float(os.environ.get("SEQ_SECONDS", "60"))
SLOW_RCVBUF = 4096  # bytes of receive buffer of a slow reader
SLOW_PIECE = 1024  # bytes one slow read takes
SLOW_PAUSE = 0.0005  # seconds between two slow reads
HITS = ["/one.txt", "/index.html", "/seg_edge.bin", "/k16.bin", "/k64.bin", "/k200.bin"]
LARGE = {"/k16.bin", "/k64.bin", "/k200.bin"}
UNCACHED = ["/missing.txt", "/sub/missing", "/app.js", "/sub/index.html"]


@dataclass(frozen=True)
class Step:
    """One request: its bytes, its method (to frame the answer), whether it ends the sequence."""
    data: bytes
    method: str
    closes: bool = False
    large: bool = False  # a large answer: a slow reader reads it slowly


@dataclass(frozen=True)
class Sequence:
    name: str
    steps: tuple[Step, ...]
    shapes: tuple[str, ...]  # per step: "one", "pipe" (with the next), "split"
    ipv6: bool = False
    slow: bool = False  # small receive buffer, slow reads of large answers


class SequenceGrammar:
    def __init__(self, seed: int, etags: dict[str, str]) -> None:
        self.rng = random.Random(seed)
        self.etags = etags

    def step(self) -> Step:
        rng = self.rng
        kind = rng.choices(["hit", "304", "miss", "range", "body", "close", "http10"],
                           [10, 2, 2, 1.5, 1, 1, 1.5])[0]
        path = rng.choice(HITS)
        method = "HEAD" if rng.random() < 0.25 else "GET"
        large = path in LARGE and method == "GET"
        if kind == "hit":
            return Step(r(f"{method} {path} HTTP/1.1"), method, large=large)
        if kind == "304":
            return Step(r(f"{method} {path} HTTP/1.1", f"If-None-Match: {self.etags[path]}"),
                        method)
        if kind == "miss":
            path = rng.choice(UNCACHED)
            return Step(r(f"{method} {path} HTTP/1.1"), method)
        if kind == "range":
            spec = rng.choice(["bytes=0-4", "bytes=100-199", "bytes=-10", "bytes=5-",
                               "bytes=0-0,2-3"])
            return Step(r(f"GET {path} HTTP/1.1", f"Range: {spec}"), "GET",
                        large=spec == "bytes=5-" and path in LARGE)
        if kind == "body":
            body = rng.randbytes(rng.choice([1, 5, 100]))
            verb = rng.choice(["POST", "POST", "GET"])
            return Step(r(f"{verb} {path} HTTP/1.1", f"Content-Length: {len(body)}") + body, verb)
        if kind == "close":
            return Step(r(f"{method} {path} HTTP/1.1", "Connection: close"), method, True, large)
        keep = rng.random() < 0.4  # HTTP/1.0 keep-alive keeps the sequence going
        fields = ["Connection: keep-alive"] if keep else []
        return Step(r(f"{method} {path} HTTP/1.0", *fields), method, not keep, large)

    def sequence(self, index: int) -> Sequence:
        rng = self.rng
        steps: list[Step] = []
        for _ in range(rng.randint(3, 10)):
            steps.append(self.step())
            if steps[-1].closes:
                break
        shapes = tuple(rng.choices(["one", "pipe", "split"], [7, 1.5, 1.5])[0] for _ in steps)
        return Sequence(f"seq{index}", tuple(steps), shapes, slow=rng.random() < 0.15)


# --- fixed cases: every difference this test found -------------------------------------------

def _hit(path: str, method: str = "GET") -> Step:
    return Step(r(f"{method} {path} HTTP/1.1"), method, large=path in LARGE)


REGRESSIONS: list[Sequence] = [
    # the documented shape: hits in kernel, a miss hands off, then user space answers
    Sequence("hit-hit-miss-hit", (_hit("/one.txt"), _hit("/k64.bin"), _hit("/missing.txt"),
                                  _hit("/k200.bin")), ("one",) * 4),
    Sequence("slow-reader-200k-then-miss", (_hit("/k200.bin"), _hit("/k200.bin"),
                                            _hit("/app.js")), ("one",) * 3, slow=True),
    Sequence("hit-then-pipelined-hit-and-close", (_hit("/one.txt"), _hit("/k16.bin"), Step(
        r("GET /one.txt HTTP/1.1", "Connection: close"), "GET", True)), ("one", "pipe", "one")),
]


# --- talking to a server ----------------------------------------------------------------------

class SlowTranscript(Transcript):
    """A Transcript whose reads take SLOW_PIECE bytes with a pause while `slow` is set."""

    slow = False

    def _recv(self) -> bytes:
        if not self.slow:
            return super()._recv()
        time.sleep(SLOW_PAUSE)
        return self.sock.recv(SLOW_PIECE)


@dataclass
class Outcome:
    stream: bytes
    answered: int = 0  # answers the kernel sent itself
    handoffs: Counter = field(default_factory=Counter)


def run(port: int, seq: Sequence, counters: Counters | None = None) -> Outcome:
    """Send `seq` on one connection, then PROBE if the server left it open; the stream back."""
    before = counters.read() if counters else Counter()
    n = next(_sources)
    ipv6 = seq.ipv6 or n % IPV6_EVERY == 0
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    source = "::1" if ipv6 else f"127.0.{n // 250 % 200 + 1}.{n % 250 + 2}"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(READ_TIMEOUT)
        if seq.slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
        sock.bind((source, 0))
        sock.connect(("::1" if ipv6 else "127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = SlowTranscript(sock)
        open_, i = True, 0
        while open_ and i < len(seq.steps):
            step, shape = seq.steps[i], seq.shapes[i]
            batch = [step]
            if shape == "pipe" and i + 1 < len(seq.steps):
                batch.append(seq.steps[i + 1])
            data = b"".join(s.data for s in batch)
            if shape == "split" and len(data) > 1:
                cut = len(data) // 2
                sock.sendall(data[:cut])
                time.sleep(SPLIT_PAUSE)  # so the second part is a segment of its own
                data = data[cut:]
            sock.sendall(data)
            t.slow = seq.slow and any(s.large for s in batch)
            open_ = t.answers(tuple(s.method for s in batch))
            t.slow = False
            i += len(batch)
        if open_:
            t.probe()
    outcome = Outcome(t.normalised())
    if counters:
        moved = counters.read() - before
        outcome.answered = moved["responses"]
        outcome.handoffs = Counter({k: v for k, v in moved.items() if k.startswith("handoff_")})
    return outcome


def describe(seq: Sequence) -> str:
    lines = [f"{seq.name} ({'IPv6, ' if seq.ipv6 else ''}{'slow reader' if seq.slow else ''})"]
    for step, shape in zip(seq.steps, seq.shapes):
        lines.append(f"  [{shape}] {step.data[:160]!r}")
    return "\n".join(lines)


def first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(pair: Pair, seq: Sequence) -> tuple[str | None, Outcome]:
    user = run(pair.user, seq)
    kernel = run(pair.kernel, seq, pair.counters)
    if user.stream == kernel.stream:
        return None, kernel
    at = max(0, first_difference(user.stream, kernel.stream) - 300)
    return (f"{describe(seq)}\nkernel answered {kernel.answered}, hand-offs "
            f"{dict(kernel.handoffs)}; streams differ at byte {at + 300} "
            f"(user {len(user.stream)} bytes, kernel {len(kernel.stream)})\n"
            f"user:   {user.stream[at:at + 900]!r}\nkernel: {kernel.stream[at:at + 900]!r}"), kernel


@pytest.fixture(scope="module")
def etags(pair: Pair) -> dict[str, str]:
    tags = {p: e for p in HITS if (e := _etag_of(pair.user, p)) is not None}
    assert set(tags) == set(HITS), tags
    return tags


# --- the tests --------------------------------------------------------------------------------

@pytest.mark.parametrize("seq", REGRESSIONS, ids=[s.name for s in REGRESSIONS])
def test_regression_sequence_matches_user_space(pair: Pair, seq: Sequence):
    for ipv6 in (False, True):
        diff, kernel = compare(pair, Sequence(seq.name, seq.steps, seq.shapes, ipv6, seq.slow))
        assert diff is None, diff
        assert kernel.answered >= 1, "the kernel answered nothing: the case proves nothing"


def test_generated_sequences_get_the_same_bytes_from_both_paths(pair: Pair,
                                                                 etags: dict[str, str]):
    grammar = SequenceGrammar(SEED, etags)
    deadline = time.monotonic() + TIME_BUDGET
    diffs: list[str] = []
    answered, handoffs, ran, requests = 0, Counter(), 0, 0
    for index in range(CONNECTIONS):
        if time.monotonic() > deadline:
            break
        seq = grammar.sequence(index)
        diff, kernel = compare(pair, seq)
        if diff:
            diffs.append(diff)
        answered += kernel.answered
        handoffs += kernel.handoffs
        requests += len(seq.steps)
        ran += 1
    print(f"\n{ran} connections, {requests} requests per server; kernel answered {answered}, "
          f"hand-offs {sum(handoffs.values())}: {dict(handoffs.most_common())}")
    assert not diffs, f"{len(diffs)} differences:\n\n" + "\n\n".join(diffs[:8])
    assert ran >= min(CONNECTIONS, 100), f"only {ran} connections within {TIME_BUDGET} s"
    assert answered > 0 and sum(handoffs.values()) > 0, (answered, dict(handoffs))
