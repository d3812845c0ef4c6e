"""cache_policy: memory cost, start-up fill order, admission, eviction and heat, as pure rules."""

from __future__ import annotations

import pytest

from fileserver_ctl import cache_policy
from fileserver_ctl.cache_policy import CachePolicy, Layout, allocation, keys_of, settled

# memlock element sizes measured on this kernel (cache.py measures them at start)
LAYOUT = Layout(entry_element=1192, chunk_element=1096, chunk_size=1024)
ENTRY, CHUNK = 2048, 2048  # their kmalloc size classes


def policy(budget: int, max_file: int = 16_000) -> CachePolicy:
    return CachePolicy(budget=budget, max_file=max_file, layout=LAYOUT)


@pytest.mark.parametrize("size,expected", [(1, 8), (8, 8), (9, 16), (96, 96), (97, 128), (193, 256),
                                           (1024, 1024), (1096, 2048), (1192, 2048), (2049, 4096),
                                           (8192, 8192), (8193, 12288), (12289, 16384)])
def test_allocation_is_the_kmalloc_size_class(size: int, expected: int):
    assert allocation(size) == expected


@pytest.mark.parametrize("size,keys,chunks", [(0, 1, 0), (1, 1, 1), (1024, 1, 1), (1025, 1, 2),
                                              (15_998, 1, 16), (10, 2, 1)])
def test_cost_counts_every_element_at_its_size_class(size: int, keys: int, chunks: int):
    assert LAYOUT.chunks(size) == chunks
    assert LAYOUT.cost(size, keys) == keys * ENTRY + chunks * CHUNK
    assert LAYOUT.memlock(size, keys) == keys * 1192 + chunks * 1096


TAILED = Layout(entry_element=296, chunk_element=2048, chunk_size=1976, tail_caps=(184, 440, 952, 1728),
                tail_elements=(256, 512, 1024, 1800), head_room=392)


@pytest.mark.parametrize("stream,full,tail", [
    (0, 0, 0), (100, 0, 2), (392, 0, 2), (441, 0, 3), (1728, 0, 4), (1729, 1, 0), (1976, 1, 0),
    (1977, 1, 1), (1976 + 184, 1, 1), (1976 + 185, 1, 2), (2 * 1976 + 1800, 3, 0), (3 * 1976, 3, 0)])
def test_the_last_chunk_takes_the_smallest_tail_that_holds_it(stream: int, full: int, tail: int):
    """A stream shorter than a chunk needs head_room bytes (the program reads the head whole);
    a last chunk longer than every cap is a file_data chunk."""
    assert cache_policy.tail_class(stream, 1976, TAILED.tail_caps, 392) == tail
    assert TAILED.pieces(0, stream) == (full, tail)
    assert TAILED.memlock(0, 1, stream) == 296 + full * 2048 + (TAILED.tail_elements[tail - 1] if tail else 0)
    assert TAILED.cost(0, 1, stream) == 512 + full * 2048 + (allocation(TAILED.tail_elements[tail - 1]) if tail else 0)


def test_index_files_answer_two_paths():
    assert keys_of("index.html") == 2 and keys_of("a/index.html") == 2
    assert keys_of("a/index.htm") == 1 and keys_of("xindex.html") == 1


def test_fill_takes_index_files_first_then_the_smallest_within_the_budget():
    p = policy(budget=6 * 2048)
    files = [("big.bin", 3000), ("a.txt", 10), ("sub/index.html", 2000), ("b.txt", 900),
             ("huge.bin", 20_000), ("c.txt", 1500)]
    # sub/index.html: 2 entries + 2 chunks = 4 units; a.txt: 2 units; nothing else fits
    assert p.fill_order(files) == ["sub/index.html", "a.txt"]
    # then b.txt (2 units) and c.txt (3 units): 11 in all; big.bin (4) would not fit
    assert policy(budget=11 * 2048).fill_order(files) == ["sub/index.html", "a.txt", "b.txt", "c.txt"]


def test_fill_skips_what_is_cached_and_counts_what_is_used():
    p = policy(budget=4 * 2048)
    p.cached("a.txt", 10, 1)
    assert p.used == 2 * 2048
    assert p.fill_order([("a.txt", 10), ("b.txt", 10), ("c.txt", 10)]) == ["b.txt"]


def test_consider_refuses_files_over_the_per_file_limit_or_the_whole_budget():
    p = policy(budget=4 * 2048, max_file=5000)
    assert not p.consider("big", 5001, 1).admit
    assert "per-file limit" in p.consider("big", 5001, 1).why
    assert not p.consider("mid", 4000, 1).admit  # 1 entry + 4 chunks > 4 units
    assert "whole budget" in p.consider("mid", 4000, 1).why
    assert p.consider("ok", 3000, 1).admit


def test_admits_at_the_first_request_while_there_is_room():
    p = policy(budget=10 * 2048)
    p.missed("a.txt")
    d = p.consider("a.txt", 100, 1)
    assert d.admit and d.evict == ()


def full_policy() -> CachePolicy:
    """Budget for 3 one-chunk files, holding cold, warm and hot (heats 0, 3, 10)."""
    p = policy(budget=6 * 2048)
    for rel in ("cold", "warm", "hot"):
        p.cached(rel, 100, 1)
    p.sweep({"cold": 0, "warm": 3, "hot": 10})
    assert (p.heat("cold"), p.heat("warm"), p.heat("hot")) == (0, 3, 10)
    return p


def test_when_full_a_file_needs_heat_to_displace_others():
    p = full_policy()
    p.missed("new")
    d = p.consider("new", 100, 1)
    assert not d.admit and "often enough" in d.why
    p.missed("new")
    d = p.consider("new", 100, 1)
    assert d.admit and d.evict == ("cold",)


def test_eviction_takes_the_coldest_and_only_as_many_as_needed():
    p = full_policy()
    p.missed("new", 5)
    d = p.consider("new", 1500, 1)  # three units: cold frees two, warm the third
    assert d.admit and d.evict == ("cold", "warm")
    p.missed("other", 2)
    d = p.consider("other", 1500, 1)
    assert not d.admit and "as often" in d.why  # warm (3) is hotter than other (2)


def test_least_recently_requested_goes_first_among_equally_cold():
    p = policy(budget=4 * 2048)
    p.cached("old", 10, 1)
    p.cached("new", 10, 1)
    p.sweep({"old": 1, "new": 0})
    p.sweep({"old": 1, "new": 1})
    for _ in range(60):  # both decay towards 0 but "new" was requested one sweep later
        p.sweep({"old": 1, "new": 1})
    assert p.heat("old") < p.heat("new") < 0.01
    p.missed("x", 3)
    assert p.consider("x", 10, 1).evict == ("old",)


def test_a_rebuilt_file_counts_only_its_growth():
    p = policy(budget=3 * 2048)
    p.cached("a", 100, 1)
    assert p.consider("a", 1000, 1).admit  # same cost
    assert p.consider("a", 1100, 1).admit  # one more chunk: 3 units in all
    assert not p.consider("a", 2100, 1).admit
    p.cached("a", 1100, 1)
    assert p.used == 3 * 2048 and len(p) == 1 and p.admitted == 1


def test_dropped_files_keep_their_heat_as_candidates():
    p = full_policy()
    p.dropped("hot", evicted=True)
    assert "hot" not in p and p.heat("hot") == 10 and p.evicted == 1
    assert p.used == 4 * 2048
    p.cached("hot", 100, 1)
    assert p.heat("hot") == 10 and p.admitted == 4


def test_sweep_folds_in_hits_and_restarts_with_a_rebuilt_entry():
    p = policy(budget=10 * 2048)
    p.cached("a", 10, 1)
    p.sweep({"a": 5})
    assert p.heat("a") == 5
    p.sweep({"a": 7})  # two more
    assert p.heat("a") == pytest.approx(5 * cache_policy.DECAY + 2)
    p.sweep({"a": 1})  # the entry was rebuilt: its counter started again
    assert p.heat("a") == pytest.approx((5 * cache_policy.DECAY + 2) * cache_policy.DECAY + 1)


def test_sweep_proposes_missed_files_and_forgets_cold_ones():
    p = full_policy()
    p.missed("once")
    p.missed("often", 4)
    p.missed("lukewarm", 2)  # reaches ADMIT_HEAT and is hotter than cold (0)
    assert p.sweep({"cold": 0, "warm": 3, "hot": 10}) == ["often", "lukewarm"]
    p2 = policy(budget=10 * 2048)
    p2.missed("a")
    assert p2.sweep({}) == ["a"]  # room: one request is enough
    for _ in range(100):
        p2.sweep({})
    assert p2.heat("a") == 0 and p2.sweep({}) == []


def test_candidates_are_bounded():
    p = policy(budget=10 * 2048)
    for i in range(3 * cache_policy.MAX_CANDIDATES):
        p.missed(f"f{i}")
    assert len(p._candidates) == 2 * cache_policy.MAX_CANDIDATES
    p.sweep({})
    assert len(p._candidates) == cache_policy.MAX_CANDIDATES


def test_declined_files_are_not_proposed_again():
    p = policy(budget=10 * 2048)
    p.missed("nope", 3)
    p.declined("nope")
    assert p.sweep({}) == [] and p.refused == 1


def test_memory_figures():
    p = policy(budget=10 * 2048)
    p.cached("index.html", 1500, 2)
    p.cached("a", 0, 1)
    assert p.body_bytes() == 1500
    assert p.memlock() == 3 * 1192 + 2 * 1096
    assert p.used == 5 * 2048
    assert p.files()["index.html"] == {"size": 1500, "cost": 4 * 2048, "heat": 0.0}


def test_settled_waits_for_the_rest_of_the_delay():
    now = 1_000_000_000_000
    assert settled(now - cache_policy.SETTLE_NS, now) == 0
    assert settled(now - 5_000_000, now) == cache_policy.SETTLE_NS - 5_000_000
    assert settled(now + 1, now) == cache_policy.SETTLE_NS + 1  # a clock step back waits too
