"""Unit tests of the event-time alignment decision (pure, no broker)."""

from __future__ import annotations

import pytest
from dataproc_shared.kafka.alignment import UNKNOWN, Alignment, ahead_partitions, frontier
from dataproc_shared.records import BatchResult

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


def test_after_a_rewind_the_partitions_report_again_before_anything_is_paused() -> None:
    al = Alignment(max_ahead_ns=S, max_pause_ns=10 * S)
    al.report({A: 0, B: 100 * S})
    assert al.decide({A, B}, 0).pause == {B}
    al.rewound()
    d = al.decide({A, B}, 1)
    assert d.resume == {B}
    al.report({B: 90 * S})
    # A has not reported since the rewind and has records waiting: B waits for it
    assert al.decide({A, B}, 2).pause == {B}
