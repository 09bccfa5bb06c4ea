"""The pure box helpers planning's hot loops use, against a brute-force count of elements."""
import random

import numpy as np

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
