"""Unit tests of the event-time alignment decision (pure, no broker)."""

from __future__ import annotations

import pytest
from dataproc_shared.kafka.alignment import UNKNOWN, Alignment, HeldRecords, Quota, ahead_partitions, frontier
from dataproc_shared.records import BatchResult, InRecord

S = 1_000_000_000
A, B, C = ("raw", 0), ("raw", 1), ("raw", 2)


def test_frontier_is_the_slowest_partition_with_records_waiting() -> None:
    times = {A: 100 * S, B: 50 * S, C: 10 * S}
    assert frontier(times, {A, B, C}) == 10 * S
    assert frontier(times, {A, B}) == 50 * S
    assert frontier(times, set()) is None


def test_a_waiting_partition_without_event_time_holds_every_other_one_back() -> None:
    assert frontier({A: 5 * S}, {A, B}) == UNKNOWN
    assert ahead_partitions({A: 5 * S, C: 6 * S}, {A, B, C}, set(), S) == {A, C}
    # once it has nothing waiting (e.g. only invalid records), it no longer does
    assert ahead_partitions({A: 5 * S, C: 6 * S}, {A, C}, set(), S) == set()


def test_partitions_ahead_of_the_frontier_by_more_than_the_bound_are_paused() -> None:
    times = {A: 100 * S, B: 101 * S, C: 103 * S}
    assert ahead_partitions(times, {A, B, C}, set(), 2 * S) == {C}
    assert ahead_partitions(times, {A, B, C}, set(), 3 * S) == set()


def test_a_caught_up_or_idle_partition_never_holds_others_back() -> None:
    times = {A: 10 * S, B: 100 * S, C: 200 * S}
    # A has nothing waiting: the frontier is B
    assert ahead_partitions(times, {B, C}, set(), 2 * S) == {C}
    # nothing waiting anywhere: nothing paused
    assert ahead_partitions(times, set(), {B, C}, 2 * S) == set()


def test_hysteresis_keeps_a_paused_partition_paused_until_half_the_bound() -> None:
    times = {A: 100 * S, B: 101_500_000_000}
    assert ahead_partitions(times, {A, B}, set(), 2 * S) == set()
    assert ahead_partitions(times, {A, B}, {B}, 2 * S) == {B}
    times[A] = 100_600_000_000
    assert ahead_partitions(times, {A, B}, {B}, 2 * S) == set()


def test_alignment_pauses_and_resumes_as_the_slow_partition_catches_up() -> None:
    al = Alignment(max_ahead_ns=2 * S, max_pause_ns=60 * S)
    al.report({A: 100 * S, B: 110 * S})
    assert al.needs_check({A, B})
    d = al.decide({A, B}, now_ns=0)
    assert d.pause == {B}
    assert d.resume == frozenset()
    assert al.held() == {B}
    al.report({A: 108 * S})
    d = al.decide({A, B}, now_ns=S)
    assert d.pause == frozenset()
    assert d.resume == frozenset()
    al.report({A: 109_500_000_000})
    d = al.decide({A, B}, now_ns=2 * S)
    assert d.resume == {B}
    assert al.held() == frozenset()
    assert al.pauses == 1


def test_slow_partition_drained_releases_the_paused_ones() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=60 * S)
    al.report({A: 0, B: 50 * S, C: 100 * S})
    assert al.decide({A, B, C}, 0).pause == {B, C}
    # A has nothing left: B is the frontier now, C is still far ahead of it
    d = al.decide({B, C}, 1)
    assert d.resume == {B}
    assert al.held() == {C}
    d = al.decide(set(), 2)
    assert d.resume == {C}
    assert al.held() == frozenset()


def test_starvation_guard_lets_a_long_paused_partition_through_once() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    al.report({A: 0, B: 300 * S})  # B's last tick is an outlier minutes ahead
    assert al.decide({A, B}, 0).pause == {B}
    assert al.decide({A, B}, 5 * S).resume == frozenset()
    d = al.decide({A, B}, 11 * S)
    assert d.resume == {B}
    assert al.guard_resumes == 1
    # not paused again before B reported a new event time
    assert al.decide({A, B}, 12 * S).pause == frozenset()
    al.report({B: 310 * S})
    assert al.decide({A, B}, 13 * S).pause == {B}


def test_forget_drops_state_of_revoked_partitions() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    al.report({A: 0, B: 100 * S})
    al.decide({A, B}, 0)
    al.forget([B])
    assert al.held() == frozenset()
    assert B not in al.event_ns
    assert not al.needs_check({A})


def test_needs_check_only_when_spread_exceeds_bound_or_something_is_paused() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    assert not al.needs_check({A, B})
    al.report({A: 0, B: S})
    assert not al.needs_check({A, B})
    assert al.needs_check({A, B, C})  # C has no event time yet
    al.report({B: S + 1})
    assert al.needs_check({A, B})


def test_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Alignment(max_ahead_ns=0, max_pause_ns=S)


def test_batch_result_extend_keeps_the_later_event_times() -> None:
    first = BatchResult(event_time_ns={A: 1, B: 2})
    first.extend(BatchResult(event_time_ns={B: 5, C: 3}))
    assert first.event_time_ns == {A: 1, B: 5, C: 3}


def test_a_rewind_keeps_the_event_times_of_the_committed_records_and_the_holds() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    al.report({A: 0, B: 100 * S})
    assert al.decide({A, B}, 0).pause == {B}
    al.rewound()
    # back at the committed offsets, whose event times are the ones reported: B stays held
    d = al.decide({A, B}, 1)
    assert d.resume == frozenset()
    assert al.held() == {B}
    assert al.event_ns == {A: 0, B: 100 * S}


# ---- held records: the loop keeps a held partition's records instead of pausing it ------------


def rec(tp: tuple[str, int], offset: int, value: bytes = b"v") -> InRecord:
    return InRecord(tp[0], tp[1], offset, b"k", value, 0)


def offsets(records: list[InRecord]) -> list[tuple[int, int]]:
    return [(r.partition, r.offset) for r in records]


def test_records_of_held_partitions_are_kept_and_the_others_pass() -> None:
    held = HeldRecords(max_records=100, max_bytes=10_000)
    ready = held.route([rec(A, 0), rec(B, 0), rec(A, 1), rec(B, 1)], holding={B})
    assert offsets(ready) == [(0, 0), (0, 1)]
    assert held.size(B) == 2
    assert held.waiting() == {B}
    assert held.active()
    # nothing held, nothing buffered: the batch passes untouched (the common case costs nothing)
    empty = HeldRecords(max_records=100, max_bytes=10_000)
    batch = [rec(A, 0)]
    assert empty.route(batch, holding=set()) is batch
    assert not empty.active()


def test_released_records_come_first_and_later_ones_queue_behind_them() -> None:
    held = HeldRecords(max_records=100, max_bytes=10_000)
    held.route([rec(B, o) for o in range(5)], holding={B})
    assert held.release(holding={B}, limit=10) == []  # still held
    first = held.release(holding=set(), limit=3)
    assert offsets(first) == [(1, 0), (1, 1), (1, 2)]
    # B is released but has records held: fresh ones of B go behind them, A's pass
    ready = held.route([rec(B, 5), rec(A, 7)], holding=set())
    assert offsets(ready) == [(0, 7)]
    assert offsets(held.release(holding=set(), limit=10)) == [(1, 3), (1, 4), (1, 5)]
    assert not held.active()
    # drained: B's records pass again
    assert offsets(held.route([rec(B, 6)], holding=set())) == [(1, 6)]


def test_release_stops_at_the_limit_across_partitions() -> None:
    held = HeldRecords(max_records=100, max_bytes=10_000)
    held.route([rec(B, 0), rec(C, 0), rec(B, 1), rec(C, 1)], holding={B, C})
    assert offsets(held.release(holding=set(), limit=3)) == [(1, 0), (1, 1), (2, 0)]
    assert len(held) == 1
    assert held.release(holding={C}, limit=10) == []  # C held again: its last record stays
    assert offsets(held.release(holding=set(), limit=10)) == [(2, 1)]


def test_a_buffer_past_its_bound_pauses_the_partition_until_half_drained() -> None:
    held = HeldRecords(max_records=4, max_bytes=10_000)
    held.route([rec(B, o) for o in range(3)], holding={B})
    assert held.bound_changes() == (frozenset(), frozenset())
    held.route([rec(B, 3)], holding={B})
    assert held.bound_changes() == (frozenset({B}), frozenset())
    assert held.paused == {B}
    assert held.bound_changes() == (frozenset(), frozenset())  # paused once
    held.release(holding=set(), limit=2)
    assert held.bound_changes() == (frozenset(), frozenset())  # 2 left: not below half
    held.release(holding=set(), limit=1)
    assert held.bound_changes() == (frozenset(), frozenset({B}))
    assert held.paused == set()
    assert held.client_pauses == 1


def test_the_byte_bound_counts_keys_and_values() -> None:
    held = HeldRecords(max_records=1_000, max_bytes=100)
    held.route([rec(B, 0, b"x" * 60), rec(B, 1, b"x" * 39)], holding={B})  # 99 + 2 key bytes
    assert held.bound_changes() == (frozenset({B}), frozenset())
    held.release(holding=set(), limit=1)
    assert held.bound_changes() == (frozenset(), frozenset({B}))  # 41 bytes < 50


def test_drop_returns_the_first_held_offset_to_seek_back_to() -> None:
    held = HeldRecords(max_records=100, max_bytes=10_000)
    held.route([rec(B, 10), rec(C, 20), rec(B, 11)], holding={B, C})
    held.release(holding={C}, limit=1)  # B's 10 goes to a batch; B's 11 is still held
    assert held.drop([B]) == {B: 11}
    assert held.waiting() == {C}
    assert held.drop() == {C: 20}
    assert not held.active()


def test_forget_drops_the_records_and_the_client_pause_of_revoked_partitions() -> None:
    held = HeldRecords(max_records=1, max_bytes=10_000)
    held.route([rec(B, 0), rec(C, 0)], holding={B, C})
    assert held.bound_changes()[0] == {B, C}
    held.forget([B])
    assert held.paused == {C}
    assert held.waiting() == {C}


def test_held_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        HeldRecords(max_records=0, max_bytes=1)


def test_the_guard_leaves_a_hold_alone_while_the_frontier_catches_up_fast() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    al.report({A: 0, B: 300 * S})
    assert al.decide({A, B}, 0).pause == {B}
    # a backlog: A advances 5 s of event time per second of wall time, B stays held past the guard
    for t in range(1, 40):
        al.report({A: 5 * t * S})
        assert al.decide({A, B}, t * S).resume == frozenset(), t
    assert al.guard_resumes == 0
    # A slows to the wall clock (live): the first guard interval with it alone lets B through
    resumed = []
    for t in range(40, 60):
        al.report({A: (156 + t) * S})
        if al.decide({A, B}, t * S).resume:
            resumed.append(t)
    assert al.guard_resumes == 1
    assert resumed == [55]


def test_shares_bring_every_waiting_partition_to_one_event_time_level() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    # A: 1 ms of event time per record, B: 25 ms; then A is 1 s behind B
    al.report({A: 0, B: 10 * S}, {A: 0, B: 0})
    al.report({A: 1 * S, B: 35 * S}, {A: 1000, B: 1000})
    al.report({A: 34 * S}, {A: 34_000})
    al.decide({A, B}, 0)
    quotas = al.quotas(2000)
    assert quotas is not None
    assert 1990 <= quotas[A] + quotas[B] <= 2000
    assert quotas[B] > 0
    level_a = al.event_ns[A] + quotas[A] * 1_000_000
    level_b = al.event_ns[B] + quotas[B] * 25_000_000
    assert abs(level_a - level_b) <= 25_000_000
    # B far ahead: it gets nothing until A has caught up
    al.report({B: 100 * S}, {B: 3600})
    assert al.quotas(1000) == {A: 1000, B: 0}


def test_shares_are_equal_until_there_are_estimates_and_none_with_one_partition_waiting() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    al.assigned([A, B, C])
    assert al.quotas(300) == {A: 100, B: 100, C: 100}
    al.report({A: 0}, {A: 5})
    assert al.decide({A}, 0) == al.decide({A}, 1)
    assert al.quotas(300) is None


def test_a_quota_keeps_a_partitions_records_past_its_share() -> None:
    held = HeldRecords(max_records=100, max_bytes=10**6)
    quota = Quota({A: 2, B: 0})
    ready = held.route([rec(A, 0), rec(A, 1), rec(A, 2), rec(B, 0), rec(C, 0)], set(), quota)
    assert [(r.partition, r.offset) for r in ready] == [(0, 0), (0, 1)]
    assert (held.size(A), held.size(B), held.size(C)) == (1, 1, 1)  # C: not waiting, no share
    assert quota.closed() == {A, B}
    nxt = Quota({A: 5, B: 1, C: 1})
    released = held.release(set(), 10, nxt)
    assert [(r.partition, r.offset) for r in released] == [(0, 2), (1, 0), (2, 0)]
    assert nxt.room(A) == 4


def test_a_batch_within_every_share_stays_whole_and_one_past_a_share_is_cut() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    # live: A and B at about the same event time, 1 ms of event time per record each
    al.report({A: 0, B: 0}, {A: 0, B: 0})
    al.report({A: S, B: S}, {A: 1000, B: 1000})
    al.decide({A, B}, 0)
    assert al.quotas(100) == {A: 50, B: 50}
    al.shared_batches = 0
    # 30 records of each: the shares (50 each) would not change the batch
    assert al.cut(100, {A: 1001, B: 1001}, {A: 1030, B: 1030}) is None
    # a partition not waiting has no share; one record of A past its share
    assert al.cut(100, {A: 1001, C: 7}, {A: 1001, C: 7}) == {A: 50, B: 50}
    assert al.cut(100, {A: 1001}, {A: 1051}) == {A: 50, B: 50}
    assert al.cut(100, {A: 1001}, {A: 1050}) is None
    assert (al.whole_batches, al.shared_batches) == (2, 2)
    # B a second ahead: it has no share at all, any record of it makes a cut
    al.report({B: 2 * S}, {B: 2000})
    assert al.cut(100, {B: 2001}, {B: 2001}) == {A: 100, B: 0}
    # fewer than two partitions waiting: the holds decide, nothing to cut and nothing counted
    al.decide({A}, 1)
    assert al.cut(100, {A: 1001}, {A: 1900}) is None
    assert (al.whole_batches, al.shared_batches) == (2, 3)
