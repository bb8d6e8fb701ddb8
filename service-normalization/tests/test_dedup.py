"""Unit tests of the dedup memory: window, expiry by event time, hard cap, changelog round trip."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from normalization.dedup import WATERMARK_KEY, DedupEntry, DedupWindow

S = 1_000_000_000


def test_duplicate_inside_window_only() -> None:
    w = DedupWindow(window_ns=10 * S, max_entries=100)
    assert not w.check("V:1", 100 * S, offset=0).duplicate
    verdict = w.check("V:1", 110 * S, offset=1)
    assert verdict.duplicate
    assert verdict.first == DedupEntry(100 * S, 0)
    assert w.check("V:1", 90 * S, offset=2).duplicate  # earlier event time, still inside
    assert not w.check("V:1", 111 * S, offset=3).duplicate  # outside: accepted, replaces the entry
    assert w.check("V:1", 120 * S, offset=4).duplicate


def test_same_offset_is_never_its_own_duplicate() -> None:
    w = DedupWindow(window_ns=10 * S, max_entries=100)
    assert not w.check("V:1", 100 * S, offset=5).duplicate
    assert not w.check("V:1", 100 * S, offset=5).duplicate
    assert len(w) == 1


def test_expiry_by_event_time_writes_tombstones() -> None:
    w = DedupWindow(window_ns=10 * S, max_entries=100)
    w.check("V:1", 100 * S, offset=0)
    w.check("V:2", 105 * S, offset=1)
    w.clear_pending()
    w.check("V:3", 112 * S, offset=2)  # horizon 102 s: V:1 expires, V:2 stays
    assert len(w) == 2
    assert w.expired == 1
    assert dict(w.pending_changes()) == {
        "V:1": None,
        "V:3": DedupEntry(112 * S, 2),
        WATERMARK_KEY: DedupEntry(112 * S, -1),
    }
    # Expired: the same trade id is accepted again.
    assert not w.check("V:1", 100 * S, offset=3).duplicate


def test_hard_cap_evicts_oldest_first() -> None:
    w = DedupWindow(window_ns=10**6 * S, max_entries=3)
    for i in range(5):
        w.check(f"V:{i}", (100 + i) * S, offset=i)
    assert len(w) == 3
    assert w.evicted == 2
    pending = dict(w.pending_changes())
    assert pending["V:0"] is None
    assert pending["V:1"] is None
    assert not w.check("V:0", 100 * S, offset=9).duplicate
    assert w.check("V:4", 104 * S, offset=10).duplicate


def test_restore_replays_changes_in_order_and_enforces_bounds() -> None:
    w = DedupWindow(window_ns=10 * S, max_entries=2)
    w.restore(
        [
            ("V:1", DedupEntry(100 * S, 0)),
            ("V:2", DedupEntry(101 * S, 1)),
            ("V:1", None),
            ("V:3", DedupEntry(112 * S, 2)),
            ("V:4", DedupEntry(120 * S, 3)),
        ]
    )
    assert w.watermark_ns == 120 * S
    assert len(w) == 2
    assert dict(w.pending_changes()) == {"V:2": None}
    assert w.check("V:3", 115 * S, offset=7).duplicate


def test_entry_codec() -> None:
    entry = DedupEntry(1_763_908_200_123_456_789, 2**40)
    assert DedupEntry.decode(entry.encode()) == entry
    assert len(entry.encode()) == 16


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 10_000)),
        max_size=300,
    ),
    st.integers(1, 20),
)
def test_memory_bounded_and_changelog_replay_equals_memory(events: list[tuple[int, int]], cap: int) -> None:
    w = DedupWindow(window_ns=500, max_entries=cap)
    log: list[tuple[str, DedupEntry | None]] = []
    for offset, (trade, ts) in enumerate(events):
        w.check(f"V:{trade}", ts, offset)
        assert len(w) <= cap
        if offset % 7 == 0:  # a commit every few records
            log.extend(w.pending_changes())
            w.clear_pending()
    log.extend(w.pending_changes())
    restored = DedupWindow(window_ns=500, max_entries=cap)
    restored.restore(log)
    horizon = w.watermark_ns - 500
    assert restored.watermark_ns == w.watermark_ns
    for key in {f"V:{t}" for t, _ in events}:
        kept = restored._entries.get(key)
        original = w._entries.get(key)
        if kept is not None:
            assert kept == original
        elif original is not None:
            # Only an entry already past the window may be dropped by the restore's full expiry scan.
            assert original.ts_ns < horizon
            assert dict(restored.pending_changes())[key] is None
