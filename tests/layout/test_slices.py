"""The pure box helpers planning's hot loops use, against a brute-force count of elements."""
import random

import numpy as np
import pytest

from mindformers_st.layout.slices import TensorSlice, box_within, pairwise_disjoint

SHAPE = (4, 6)
BOXES = [TensorSlice(SHAPE, (o0, o1), (s0, s1)) for o0, s0 in
         [(0, 4), (0, 2), (2, 2), (1, 2), (0, 1), (3, 1)] for o1, s1 in
         [(0, 6), (0, 3), (3, 3), (2, 2), (1, 4), (5, 1)]]


def _mask(sl: TensorSlice) -> np.ndarray:
    m = np.zeros(SHAPE, bool)
    m[sl.index()] = True
    return m


def test_box_within_agrees_with_element_masks():
    for a in BOXES:
        for b in BOXES:
            want = not (_mask(a) & ~_mask(b)).any()
            assert box_within(a.offsets, a.sizes, b.offsets, b.sizes) == want, (a, b)


def test_pairwise_disjoint_agrees_with_element_counts():
    rng = random.Random(5)
    seen = {True: 0, False: 0}
    for _ in range(500):
        slices = rng.sample(BOXES, rng.randint(0, 4))
        count = sum((_mask(s).astype(int) for s in slices), np.zeros(SHAPE, int))
        want = bool((count <= 1).all())
        assert pairwise_disjoint(slices) == want, slices
        assert pairwise_disjoint(iter(slices)) == want   # any iterable, consumed once
        seen[want] += 1
    assert seen[True] > 20 and seen[False] > 20   # both answers were exercised


def test_block_inside_agrees_with_element_masks_and_refuses_bad_boxes():
    from mindformers_st.layout.slices import block_inside
    rng = random.Random(7)
    for _ in range(500):
        offsets = tuple(rng.randint(-1, 6) for _ in SHAPE)
        sizes = tuple(rng.randint(-1, 6) for _ in SHAPE)
        want = all(o >= 0 and s >= 0 and o + s <= n for o, s, n in zip(offsets, sizes, SHAPE))
        assert block_inside(SHAPE, offsets, sizes) == want, (offsets, sizes)
    assert not block_inside(SHAPE, (0,), (4, 6))          # one entry per dimension
    assert not block_inside(SHAPE, (0, 0), (4,))
    assert block_inside((), (), ())                        # a scalar
    with pytest.raises(ValueError, match="dim 1"):
        TensorSlice(SHAPE, (0, 5), (4, 2))                 # the slice names the dimension
    with pytest.raises(ValueError, match="rank mismatch"):
        TensorSlice(SHAPE, (0,), (4, 6))


def test_from_json_refuses_non_integers_and_reuses_equal_blocks():
    good = {"global_shape": [4, 6], "offsets": [2, 0], "sizes": [2, 6]}
    memo = {}
    a = TensorSlice.from_json(good, memo)
    assert a == TensorSlice((4, 6), (2, 0), (2, 6)) and TensorSlice.from_json(dict(good), memo) is a
    assert TensorSlice.from_json(good) is not a and TensorSlice.from_json(good) == a
    for bad in ([4.0, 6], [True, 6]):   # equal to an int, still not one: refused even after a hit
        with pytest.raises(ValueError, match="integers"):
            TensorSlice.from_json(dict(good, global_shape=bad), memo)
    with pytest.raises(ValueError):
        TensorSlice.from_json(dict(good, offsets=[3, 0]), memo)   # leaves the tensor
    with pytest.raises(KeyError):
        TensorSlice.from_json({"offsets": [0], "sizes": [1]}, memo)
    for extra in ({"stride": [6, 1]}, {"global_shape ": [4, 6]}):   # unknown: refused, not ignored
        with pytest.raises(ValueError, match="unknown keys"):
            TensorSlice.from_json(dict(good, **extra), memo)


def test_whole_is_shared_per_shape_and_hash_is_by_value():
    w = TensorSlice.whole([4, 6])
    assert w is TensorSlice.whole((4, 6)) and w is TensorSlice.whole(np.array([4, 6]))
    assert type(w.global_shape[0]) is int
    with pytest.raises(ValueError, match="negative"):
        TensorSlice.whole((4, -1))
    same = TensorSlice((4, 6), (0, 0), (4, 6))
    assert same == w and hash(same) == hash(w) and {w: 1}[same] == 1


def test_tiles_agrees_with_element_counts():
    from mindformers_st.layout.slices import tiles
    rng = random.Random(9)
    whole = TensorSlice.whole(SHAPE)
    seen = {True: 0, False: 0}
    for trial in range(800):
        target = whole if trial % 2 else rng.choice(BOXES)
        inside = [b for b in BOXES if box_within(b.offsets, b.sizes, target.offsets, target.sizes)]
        pieces = rng.sample(inside, min(len(inside), rng.randint(1, 4)))
        count = sum((_mask(s).astype(int) for s in pieces), np.zeros(SHAPE, int))
        want = bool((count[target.index()] == 1).all())
        assert tiles(target, pieces) == want, (target, pieces)
        seen[want] += 1
    assert seen[True] > 20 and seen[False] > 20
