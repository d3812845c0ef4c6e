"""Per-worker answer tallies, added to the worker's shared user-stats slot once a second.

`userstats.SlotRecorder.record()` costs about a microsecond per answer (a bisect and seven
memoryview updates), several percent of a request at 50k req/s. A worker keeps plain Python
counters instead, measures latency once per batch of answers written together, and adds the
totals to its slot on its once-a-second clock; readers sample once a second anyway.
"""

from __future__ import annotations

from bisect import bisect_left

from . import userstats

# The slot's word layout is documented in userstats.py; SlotRecorder has no bulk add yet.
_REQUESTS, _BYTES, _LATENCY_NS = userstats._REQUESTS, userstats._BYTES, userstats._LATENCY_NS
_CLASS0, _BUCKET0 = userstats._CLASS0, userstats._BUCKET0


class Tally:
    """Answers since the last flush: count, body bytes, status classes, latency histogram."""

    __slots__ = ("requests", "bytes", "classes", "latency", "buckets")

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.classes = [0] * 6  # indexed by status // 100
        self.latency = 0.0  # seconds, summed over answers
        self.buckets = [0] * (len(userstats.LATENCY_BUCKETS) + 1)

    def add_latency(self, seconds: float, answers: int) -> None:
        """`answers` answers written `seconds` after their request bytes arrived."""
        self.latency += seconds * answers
        self.buckets[bisect_left(userstats.LATENCY_BUCKETS, seconds)] += answers

    def flush_into(self, slot: userstats.SlotRecorder | None) -> None:
        if slot is not None and self.requests:
            words, base = slot._words, slot._base
            words[base + _REQUESTS] += self.requests
            words[base + _BYTES] += self.bytes
            words[base + _LATENCY_NS] += int(self.latency * 1e9)
            for i, name in enumerate(userstats.STATUS_CLASSES):
                words[base + _CLASS0 + i] += self.classes[int(name[0])]
            for i, count in enumerate(self.buckets):
                if count:
                    words[base + _BUCKET0 + i] += count
        self.__init__()
