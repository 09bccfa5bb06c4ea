"""`fast_init`: the quick `__init__` keeps every promise of the dataclass it replaces."""
import dataclasses
from dataclasses import InitVar, dataclass, field
from typing import List

import pytest

from mindformers_st.fast_init import fast_init


@fast_init
@dataclass(frozen=True)
class Record:
    name: str
    shape: tuple
    begin: int = 0
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        if self.begin < 0:
            raise ValueError("negative begin")


@dataclass(frozen=True)
class Plain:   # the same class as dataclasses makes it: the reference
    name: str
    shape: tuple
    begin: int = 0
    tags: List[str] = field(default_factory=list)


def test_the_fast_init_builds_what_the_generated_one_builds():
    for args, kwargs in [(("a", (2, 3)), {}), (("a", (2,), 5), {}), (("a",), {"shape": (1,)}),
                         ((), {"name": "b", "shape": (), "begin": 1, "tags": ["x"]})]:
        fast, plain = Record(*args, **kwargs), Plain(*args, **kwargs)
        assert dataclasses.astuple(fast) == dataclasses.astuple(plain)
        assert repr(fast).replace("Record", "Plain") == repr(plain)
    assert Record("a", (1,)) == Record("a", (1,)) != Record("a", (2,))
    assert hash(Record("a", (1,), 2, ())) == hash(Record("a", (1,), 2, ()))
    assert Record("a", (1,)).tags is not Record("a", (1,)).tags   # a fresh list each time
    assert dataclasses.replace(Record("a", (1,)), begin=3).begin == 3


def test_the_record_stays_frozen_and_validated():
    r = Record("a", (1,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "b"
    with pytest.raises(ValueError, match="negative"):
        Record("a", (1,), -1)   # __post_init__ still runs
    with pytest.raises(TypeError):
        Record("a")             # a missing argument is still an error
    with pytest.raises(TypeError):
        Record("a", (1,), 0, [], 9)


def test_classes_it_cannot_reproduce_are_refused():
    @dataclass
    class WithInitVar:
        a: int
        b: InitVar[int] = 0

    @dataclass
    class NotInit:
        a: int
        b: int = field(init=False, default=0)

    @dataclass(kw_only=True)
    class KeywordOnly:
        a: int

    @dataclass(slots=True)
    class Slotted:
        a: int

    class NotADataclass:
        pass
    for cls in (WithInitVar, NotInit, KeywordOnly, Slotted, NotADataclass):
        with pytest.raises(TypeError, match="fast_init"):
            fast_init(cls)
