"""The offset watermark: only the contiguous prefix of finished messages may ever be committed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from volley_kafka.offsets import OffsetTracker, PartitionOffsets


def test_in_order_acks_move_the_watermark_one_by_one() -> None:
    state = PartitionOffsets()
    assert state.watermark == -1, "nothing consumed: nothing to commit"
    for offset in range(10, 15):
        state.consumed(offset)
    assert state.watermark == 10
    state.finished(10)
    assert state.watermark == 11
    state.finished(11)
    state.finished(12)
    assert state.watermark == 13
    state.finished(13)
    state.finished(14)
    assert state.watermark == 15, "all finished: one past the last consumed"
    assert state.pending == 0


def test_a_later_message_finishing_first_never_moves_the_commit_past_an_earlier_one() -> None:
    state = PartitionOffsets()
    for offset in range(5):
        state.consumed(offset)
    state.finished(3)
    state.finished(4)
    state.finished(1)
    assert state.watermark == 0, "offset 0 is still running"
    state.finished(0)
    assert state.watermark == 2, "0 and 1 are done, 2 is not"
    state.finished(2)
    assert state.watermark == 5
    assert not state.done, "the out-of-order set is emptied once the gap closes"


def test_gaps_in_offsets_are_fine() -> None:
    """Compaction and transaction markers leave offsets that are never consumed."""
    state = PartitionOffsets()
    for offset in (3, 7, 8, 20):
        state.consumed(offset)
    state.finished(7)
    assert state.watermark == 3
    state.finished(3)
    assert state.watermark == 8
    state.finished(20)
    state.finished(8)
    assert state.watermark == 21


def test_acks_of_unknown_or_old_offsets_change_nothing() -> None:
    state = PartitionOffsets()
    for offset in range(100, 103):
        state.consumed(offset)
    state.finished(99)  # from before the assignment
    state.finished(500)  # never consumed
    assert state.watermark == 100
    assert not state.done
    state.finished(100)
    state.finished(100)  # twice
    assert state.watermark == 101


def test_a_nack_redelivers_only_the_nacked_offsets() -> None:
    """A nack seeks back; re-read messages that finished or are still running are not handed out twice."""
    state = PartitionOffsets()
    for offset in range(10):
        assert state.consumed(offset)
    state.finished(0)
    state.finished(6)
    assert state.nacked(4)
    assert state.nacked(2)
    assert not state.nacked(6), "a finished offset cannot be nacked"
    assert not state.nacked(0), "an offset behind the watermark cannot be nacked"
    assert not state.nacked(42), "an offset never consumed cannot be nacked"
    assert state.watermark == 1
    # The seek to 2 reads 2..9 again, then new messages follow.
    handed_out = [offset for offset in range(2, 12) if state.consumed(offset)]
    assert handed_out == [2, 4, 10, 11]
    assert not state.redeliver
    for offset in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11):
        state.finished(offset)
    assert state.watermark == 12


def test_rewind_forgets_everything_from_the_offset_on() -> None:
    """An aborted transaction: finished or not, everything from the offset on is consumed again."""
    state = PartitionOffsets()
    for offset in range(10):
        state.consumed(offset)
    state.finished(0)
    state.finished(6)
    state.nacked(8)
    state.rewind(4)
    assert state.watermark == 1
    assert state.next == 4
    assert not state.redeliver
    state.finished(6)  # a late ack of a rewound message: ignored
    assert 6 not in state.done
    assert state.consumed(4)
    assert state.consumed(5)
    for offset in (1, 2, 3, 4, 5):
        state.finished(offset)
    assert state.watermark == 6


def test_reading_backwards_hands_out_nothing_twice() -> None:
    state = PartitionOffsets()
    for offset in range(5):
        state.consumed(offset)
    assert not state.consumed(2)
    assert list(state.outstanding) == [0, 1, 2, 3, 4]
    assert state.next == 5


def test_restart_is_the_last_commit_or_the_first_offset_consumed() -> None:
    state = PartitionOffsets()
    assert state.restart == -1
    for offset in range(40, 45):
        state.consumed(offset)
    assert state.restart == 40
    state.finished(40)
    state.finished(41)
    state.committed = state.watermark
    assert state.restart == 42


def test_a_run_registered_at_once_is_the_same_as_one_by_one() -> None:
    one, run = PartitionOffsets(), PartitionOffsets()
    for offset in (4, 5, 7):
        one.consumed(offset)
    run.register([4, 5, 7])
    assert (run.first, run.next, list(run.outstanding)) == (one.first, one.next, list(one.outstanding))


def test_attempts_of_an_offset_go_when_it_finishes() -> None:
    state = PartitionOffsets()
    state.register([0, 1])
    assert state.nacked(1)
    state.attempts[1] = 2
    state.finished(0)
    assert state.attempts == {1: 2}
    state.finished(1)
    assert state.attempts == {}
    assert state.watermark == 2


def test_records_fetched_before_a_rewind_are_stale_until_the_rewound_offset_comes_back() -> None:
    state = PartitionOffsets()
    state.register([10, 11, 12])
    state.rewound(10, epoch=3)
    assert state.next == 10 and not state.outstanding
    assert not state.stale(12, epoch=3), "fetched after the seek (same epoch): not stale"
    assert state.stale(12, epoch=2), "fetched before the seek, above the offset sought"
    assert not state.stale(9, epoch=2)
    assert not state.stale(10, epoch=2), "the offset sought itself: the seek took effect"
    assert not state.stale(12, epoch=2), "from then on nothing is stale"


def test_forgetting_a_partition_drops_its_attempts_and_pending_rewind() -> None:
    tracker = OffsetTracker()
    state = tracker.partition("t", 0)
    state.register([0])
    state.attempts[0] = 3
    state.rewound(0, epoch=1)
    tracker.forget([("t", 0)])
    fresh = tracker.partition("t", 0)
    assert fresh is not state and fresh.attempts == {} and fresh.sought_epoch == 0


def test_tracker_commits_only_partitions_that_moved() -> None:
    tracker = OffsetTracker()
    for offset in range(3):
        tracker.consumed("a", 0, offset)
        tracker.consumed("a", 1, offset)
        tracker.consumed("b", 0, offset)
    tracker.finished("a", 0, 0)
    tracker.finished("a", 1, 1)  # not contiguous
    tracker.finished("b", 0, 0)
    tracker.finished("b", 0, 1)
    committable = tracker.committable()
    assert sorted(committable) == [("a", 0, 1), ("b", 0, 2)]
    tracker.mark_committed(committable)
    assert tracker.committable() == [], "nothing moved since the last commit"
    tracker.finished("a", 1, 0)
    assert tracker.committable() == [("a", 1, 2)]
    assert tracker.committable(only=[("a", 0), ("zzz", 9)]) == []
    tracker.commit_failed([("b", 0, 2)])
    assert tracker.committable(only=[("b", 0)]) == [("b", 0, 2)], "a failed commit is retried"
    assert tracker.pending() == 4  # a[0]: 1, 2; a[1]: 2; b[0]: 2
    tracker.forget([("a", 0)])
    assert ("a", 0) not in tracker.partitions
    tracker.finished("a", 0, 1)  # an ack for a forgotten partition: ignored
    assert tracker.watermark("a", 0) == -1


@settings(max_examples=300, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=60),
    start=st.integers(min_value=0, max_value=10_000),
    gaps=st.lists(st.integers(min_value=1, max_value=3), min_size=60, max_size=60),
    data=st.data(),
)
def test_watermark_is_always_the_lowest_unfinished_offset(count: int, start: int, gaps: list[int],
                                                           data: st.DataObject) -> None:
    """Whatever the order of acks, the watermark never passes an unfinished offset and never goes back."""
    offsets = []
    offset = start
    for gap in gaps[:count]:
        offsets.append(offset)
        offset += gap
    state = PartitionOffsets()
    for o in offsets:
        state.consumed(o)
    order = data.draw(st.permutations(offsets))
    finished: set[int] = set()
    previous = state.watermark
    for o in order:
        state.finished(o)
        finished.add(o)
        unfinished = [x for x in offsets if x not in finished]
        expected = min(unfinished) if unfinished else offsets[-1] + 1
        assert state.watermark == expected
        assert state.watermark >= previous
        previous = state.watermark
    assert not state.done
    assert not state.outstanding


def test_a_fence_lifts_once_its_delay_is_over_and_what_came_before_it_is_committed_or_being_committed() -> None:
    state = PartitionOffsets()
    for offset in range(10, 20):
        state.consumed(offset)
    state.fenced_at(15, until=5.0)
    state.fenced_at(17, until=3.0)  # a later one neither moves the fence up nor shortens its delay
    assert (state.fence, state.fence_until) == (15, 5.0)
    state.fenced_at(12, until=4.0)
    assert (state.fence, state.fence_until) == (12, 5.0), "an earlier input given back moves the fence down"
    assert not state.fence_passable(6.0), "10 and 11 are neither committed nor being committed"
    assert not state.fence_passable(4.0, committing=12), "the delay is not over"
    assert state.fence_passable(6.0, committing=12)
    state.committed = 12
    assert state.fence_passable(6.0)
