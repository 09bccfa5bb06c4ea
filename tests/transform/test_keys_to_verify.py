"""`keys_to_verify` against a brute-force reference: a stored tensor is hashed in `read` mode
exactly when the plan's reads of it and of its replicas (same name, same stored shape, other
files) cover every element; `full` hashes all it touches; `off` none."""
import random

import numpy as np

from mindformers_st.transform.plan import CopyOp, Plan, TargetFile, TargetTensor
from mindformers_st.transform.verify import keys_to_verify

SHAPE = (4, 6)
BLOCKS = [((o0, o1), (s0, s1)) for o0, s0 in [(0, 4), (0, 2), (2, 2), (1, 3)]
          for o1, s1 in [(0, 6), (0, 3), (3, 3), (2, 4)]]


def _reference(reads, shapes):
    """{key: its reads as element masks}, grouped by (name, shape), covered -> whole group."""
    groups = {}
    for key, blocks in reads.items():
        groups.setdefault((key[1], shapes[key][0]), []).append(key)
    out = set()
    for (_, shape), keys in groups.items():
        mask = np.zeros(shape, bool)
        for k in keys:
            for off, size in reads[k]:
                mask[tuple(slice(o, o + s) for o, s in zip(off, size))] = True
        if mask.all():
            out.update(keys)
    return out


def test_read_mode_hashes_exactly_the_tensors_read_whole_with_their_replicas():
    rng = random.Random(11)
    files = [f"/src/rank_{r}/c.safetensors" for r in range(3)]
    seen = {"some": 0, "none": 0}
    for trial in range(300):
        shapes, reads, tensors = {}, {}, []
        for n in ("w", "v"):
            other = (2, 6) if rng.random() < 0.3 else SHAPE   # a same-named tensor of another shape
            for f in rng.sample(files, rng.randint(1, 3)):
                key = (f, n)
                shapes[key] = (other if f == files[2] else SHAPE, "F32")
                ops = []
                for _ in range(rng.randint(1, 3)):
                    off, size = rng.choice(BLOCKS)
                    if not all(o + s <= d for o, s, d in zip(off, size, shapes[key][0])):
                        off, size = (0, 0), shapes[key][0]
                    ops.append(CopyOp(f, n, off, (0, 0), size))
                    reads.setdefault(key, []).append((off, size))
                tensors += [TargetTensor(f"{n}{len(tensors)}", "F32", op.sizes, (op,)) for op in ops]
        plan = Plan("test", (TargetFile("out", tuple(tensors)),))
        want = _reference(reads, shapes)
        assert keys_to_verify(plan, shapes, "read") == want, reads
        assert keys_to_verify(plan, shapes, "full") == set(reads)
        assert keys_to_verify(plan, shapes, "off") == set()
        seen["some" if want else "none"] += 1
    assert seen["some"] > 30 and seen["none"] > 30   # both answers were exercised
