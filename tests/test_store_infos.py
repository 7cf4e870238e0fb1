"""InfoList: the compact list of MessageInfo the mbox store hands to sessions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailsrv.interfaces import SEEN, MessageInfo
from mailsrv.store.infos import InfoList, flag_sets, uids_of

A = MessageInfo(1, 10, frozenset(), 1.5)
B = MessageInfo(2, 20, frozenset({SEEN}), 2.5)
C = MessageInfo(5, 30, frozenset({"$Junk"}), 3.0)


def test_acts_as_a_list_of_message_info():
    infos = InfoList.of([A, B, C])
    assert len(infos) == 3 and infos and not InfoList()
    assert infos[0] == A and infos[-1] == C and list(infos) == [A, B, C]
    assert infos == [A, B, C] and [A, B, C] == infos and infos != [A, B]
    assert infos[1:] == [B, C] and isinstance(infos[1:], InfoList)
    assert tuple(infos[3:]) == ()
    assert list(uids_of(infos)) == [1, 2, 5] and list(flag_sets(infos))[1] == {SEEN}
    assert uids_of([A, C]) == [1, 5] and flag_sets([B]) == [frozenset({SEEN})]


def test_copies_do_not_see_later_changes_either_way():
    base = InfoList.of([A, B])
    view = base.copy()
    base.append(C)
    base.set_flags(0, frozenset({SEEN}))
    assert view == [A, B]
    assert base == [MessageInfo(1, 10, frozenset({SEEN}), 1.5), B, C]
    other = base.copy()
    other[2] = MessageInfo(5, 31, frozenset(), 4.0)
    other.set_flags(1, frozenset())
    assert base[2] == C and base[1] == B
    assert other[2].size == 31 and other[1].flags == frozenset()


@given(
    st.lists(
        st.tuples(
            st.integers(1, 2**40),
            st.integers(0, 2**40),
            st.sampled_from([frozenset(), frozenset({SEEN}), frozenset({"a", "b"})]),
            st.floats(0, 2e9),
        ),
        max_size=30,
    )
)
def test_round_trip(rows):
    infos = [MessageInfo(*r) for r in rows]
    packed = InfoList.of(infos)
    assert list(packed) == infos and packed == infos
    assert [packed[i] for i in range(len(infos))] == infos
