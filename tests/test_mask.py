"""causal_mask and MaskCache: values, LRU bound and order, counters, read-only entries, threads."""
import sys
import threading

import numpy as np
import pytest

from numba_attn import MaskCache, causal_mask
from tests.reference import causal_mask_ref


@pytest.mark.parametrize("q_len,kv_len", [(1, 1), (7, 7), (7, 129), (129, 129), (1, 129),
                                          (129, 7), (3, 1)])
def test_causal_mask_matches_reference(q_len, kv_len):
    m = causal_mask(q_len, kv_len)
    assert m.shape == (q_len, kv_len) and m.dtype == np.float32
    np.testing.assert_array_equal(m, causal_mask_ref(q_len, kv_len))
    assert set(np.unique(m)) <= {0.0, -np.inf}


def test_causal_mask_bottom_right_details():
    np.testing.assert_array_equal(causal_mask(1, 5), np.zeros((1, 5)))     # decode sees all
    m = causal_mask(2, 4)                               # queries at positions 2 and 3
    np.testing.assert_array_equal(m, [[0, 0, 0, -np.inf], [0, 0, 0, 0]])
    m = causal_mask(4, 2)                               # more queries than keys
    np.testing.assert_array_equal(m, [[-np.inf, -np.inf], [-np.inf, -np.inf],
                                      [0, -np.inf], [0, 0]])
    # sanity: top-left alignment would differ whenever q_len != kv_len
    assert not np.array_equal(causal_mask(2, 4), np.triu(np.full((2, 4), -np.inf), 1))


# ---------------------------------------------------------------------------- MaskCache

def test_cache_hits_misses_len_and_contains():
    cache = MaskCache(max_entries=4)
    assert len(cache) == 0 and cache.hits == 0 and cache.misses == 0
    a = cache.get(7, 129)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)
    np.testing.assert_array_equal(a, causal_mask_ref(7, 129))
    b = cache.get(7, 129)
    assert b is a
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    c = cache.get(129, 7)                               # (q, kv) order matters
    assert c is not a and c.shape == (129, 7)
    np.testing.assert_array_equal(c, causal_mask_ref(129, 7))
    assert (cache.hits, cache.misses, len(cache)) == (1, 2, 2)
    assert (7, 129) in cache and (129, 7) in cache and (7, 7) not in cache
    assert "entries=2/4" in repr(cache)


def test_cache_returns_read_only_arrays():
    cache = MaskCache()
    m = cache.get(5, 9)
    assert not m.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        m[0, 0] = 1.0
    np.testing.assert_array_equal(cache.get(5, 9), causal_mask_ref(5, 9))   # entry intact


def test_cache_is_bounded_and_evicts_least_recently_used():
    cache = MaskCache(max_entries=3)
    a, b, c = cache.get(1, 1), cache.get(2, 2), cache.get(3, 3)
    assert len(cache) == 3
    assert cache.get(1, 1) is a                         # (1, 1) is now the most recent
    cache.get(4, 4)                                     # evicts (2, 2), the least recent
    assert len(cache) == 3
    assert (2, 2) not in cache and (1, 1) in cache and (3, 3) in cache and (4, 4) in cache
    assert cache.get(3, 3) is c                         # order now: (1,1) (4,4) (3,3)
    cache.get(5, 5)                                     # evicts (1, 1)
    assert (1, 1) not in cache and (4, 4) in cache and (3, 3) in cache and (5, 5) in cache
    misses = cache.misses
    b2 = cache.get(2, 2)                                # rebuilt after eviction: a miss
    assert cache.misses == misses + 1 and b2 is not b
    np.testing.assert_array_equal(b2, causal_mask_ref(2, 2))
    assert len(cache) == 3
    for n in range(10, 40):                             # never grows past the bound
        cache.get(n, n + 1)
        assert len(cache) <= 3


def test_cache_of_one_entry():
    cache = MaskCache(max_entries=1)
    a = cache.get(3, 4)
    cache.get(4, 3)
    assert len(cache) == 1 and (3, 4) not in cache
    assert cache.get(3, 4) is not a and cache.misses == 3 and cache.hits == 0


def test_cache_clear_resets_entries_and_counters():
    cache = MaskCache(max_entries=8)
    for n in (1, 2, 3, 2, 1):
        cache.get(n, 9)
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 3)
    cache.clear()
    assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
    assert (1, 9) not in cache
    cache.get(1, 9)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)


def test_failed_get_leaves_the_cache_unchanged():
    cache = MaskCache(max_entries=2)
    cache.get(2, 3)
    with pytest.raises(ValueError, match="q_len"):
        cache.get(0, 3)
    with pytest.raises(ValueError, match="kv_len"):
        cache.get(2, -1)
    assert (cache.hits, cache.misses, len(cache)) == (0, 1, 1)


def test_cache_is_thread_safe():
    """Many threads hammer get() over overlapping keys, more keys than the cache holds (so entries
    are evicted and rebuilt while others read): no exception, every mask right, len bounded,
    and hits + misses equals the number of calls."""
    n_threads, calls, max_entries = 8, 300, 6
    keys = [(q, kv) for q in (1, 3, 7) for kv in (7, 9, 33)]          # 9 keys > 6 entries
    expected = {key: causal_mask_ref(*key) for key in keys}
    cache = MaskCache(max_entries=max_entries)
    barrier = threading.Barrier(n_threads)
    errors, bad, sizes = [], [], []

    def worker(tid):
        rng = np.random.default_rng(tid)
        try:
            barrier.wait()
            for _ in range(calls):
                key = keys[rng.integers(len(keys))]
                m = cache.get(*key)
                if m.shape != key or m.flags.writeable or not np.array_equal(m, expected[key]):
                    bad.append(key)
                sizes.append(len(cache))
        except Exception as e:                         # noqa: BLE001 - reported below
            errors.append(repr(e))

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)                         # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors and not bad
    assert cache.hits + cache.misses == n_threads * calls
    assert cache.misses >= len(keys) and cache.hits > 0
    assert len(cache) <= max_entries and max(sizes) <= max_entries
