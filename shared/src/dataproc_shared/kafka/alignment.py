"""Event-time alignment of input partitions: which partitions to pause so none runs ahead.

A processor that merges several input partitions into one output partition (normalization
re-partitions raw ticks by instrument) makes the output's watermark the highest event time of any
of its inputs. When one input partition runs ahead in event time (a backlog drained at equal
record counts per partition, partitions with very different event-time rates), the records of the
slower partitions arrive behind that watermark and become late downstream.

The loop keeps the event time each input partition has reached (reported by the processor in
`BatchResult.event_time_ns`) and, between cycles, pauses every partition that is more than
`max_ahead_ns` ahead of the *frontier*: the lowest event time among the partitions that still have
records waiting. A partition with nothing waiting (caught up, idle) never holds others back. A
partition with records waiting but no event time known yet (just assigned, nothing valid
processed) holds every other one back until it has reported: it is never paused itself, and this
keeps the first partition that happens to be fetched from running ahead at the start of a backlog.
A paused partition resumes once it is no more than `max_ahead_ns / 2` ahead (hysteresis against
pausing and resuming every cycle), once nothing is waiting behind it, or by the starvation guard:
after `max_pause_ns` of wall time during which the frontier did not advance at least twice as
fast as the wall clock (`CATCH_UP_RATE`). The guard is for a frozen event time that nothing will
catch up with soon, e.g. an outlier record stamped minutes in the future while the others are live;
a partition resumed by the guard is not paused again before it has reported a new event time. While
the frontier catches up faster than that (a backlog), the hold lasts until it has caught up, however
long the cycles take: a guard on wall time alone let a partition through every `max_pause_ns` in a
loaded drain, and the partitions drifted thousands of seconds apart.

While two or more partitions have records waiting, `quotas` shares each batch between them: it
fills the batch up to one event-time level, each partition below it getting the records that bring
it there (their event time per record is estimated from the offsets and event times of the
reports), so one batch advances every partition to about the same event time; the shares then
decide instead of the holds. Without them a batch could be a single partition's records (what
librdkafka or the held records hand out first, or the frontier partition alone while the others
were held): a partition with few records per second of event time jumped minutes ahead in one
batch, and its output stopped for as long as the others needed to catch up (in a drain, long
enough for a downstream idle timer to close its windows; the rest of them then arrived late). While
nothing is held, the loop consumes a batch as usual and asks `cut` whether it breaks a share: only
then is it cut (with a live feed a batch holds every record fetched and stays whole).

Holding a partition does not pause it in the client: pausing makes librdkafka purge the records it
has prefetched for the partition, and resuming fetches them again (in a drain this cost a quarter of
the pipeline's throughput). The loop keeps consuming and `HeldRecords` keeps the held partitions'
records, in offset order, until the partition is released; then they are processed before any
record of that partition consumed later. Only a buffer that passes its bound (records or bytes) has
its partition paused in the client, until it has drained below half the bound. Held records are
never processed, so the offsets committed for a partition (last processed record + 1) never pass a
held record; whoever drops held records (rollback, rebalance) seeks the partition back to the first
dropped offset or to the committed offset.

This module is pure (no client calls); `KafkaLoop` applies its decisions with `pause`/`resume`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from dataproc_shared.records import InRecord

TP = tuple[str, int]


#: Frontier of a waiting partition whose event time is not known yet: it holds every other one back.
UNKNOWN = -(2**63)

#: The starvation guard leaves a hold alone while the frontier advances at least this many event-time
#: ns per wall-clock ns (a backlog being caught up with); live records advance it at about 1.
CATCH_UP_RATE = 2


def frontier(event_ns: Mapping[TP, int], waiting: Collection[TP]) -> int | None:
    """Lowest event time among the partitions with records waiting, None when nothing is waiting.

    A waiting partition without an event time yet counts as `UNKNOWN` (lower than any).
    """
    if not waiting:
        return None
    return min(event_ns.get(tp, UNKNOWN) for tp in waiting)


def ahead_partitions(event_ns: Mapping[TP, int], waiting: Collection[TP], paused: Collection[TP],
                     max_ahead_ns: int) -> set[TP]:
    """Partitions that should be paused: ahead of the frontier by more than `max_ahead_ns`.

    A partition already paused stays paused while it is more than `max_ahead_ns // 2` ahead; a
    partition without an event time is never paused.
    """
    front = frontier(event_ns, waiting)
    if front is None:
        return set()
    keep = max_ahead_ns // 2
    result = set()
    for tp, ts in event_ns.items():
        ahead = ts - front
        if ahead > max_ahead_ns or (ahead > keep and tp in paused):
            result.add(tp)
    return result


@dataclass(frozen=True, slots=True)
class Decision:
    """Partitions to pause and to resume now."""

    pause: frozenset[TP]
    resume: frozenset[TP]


class Alignment:
    """The event times and pause state of the assigned partitions (see the module docstring).

    `now_ns` values come from a monotonic clock; event times are epoch ns as the processor reports them.
    """

    def __init__(self, max_ahead_ns: int, max_pause_ns: int) -> None:
        """`max_ahead_ns` > 0: the bound; `max_pause_ns`: longest pause before the starvation guard."""
        if max_ahead_ns <= 0:
            raise ValueError("max_ahead_ns must be positive")
        self.max_ahead_ns = max_ahead_ns
        self.max_pause_ns = max_pause_ns
        self.event_ns: dict[TP, int] = {}
        #: Paused partitions and when (monotonic ns) each pause began.
        self.paused: dict[TP, int] = {}
        #: Per paused partition, the start (monotonic ns) and frontier of its current guard interval.
        self._interval: dict[TP, tuple[int, int | None]] = {}
        #: Resumed by the starvation guard and not yet reported again.
        self.exempt: set[TP] = set()
        #: Partitions with records waiting at the last decision.
        self.waiting: frozenset[TP] = frozenset()
        #: Event-time ns per record of each partition (estimate from the reports) and the last report.
        self.step_ns: dict[TP, float] = {}
        self._last: dict[TP, tuple[int, int]] = {}
        self.pauses = 0
        self.guard_resumes = 0
        #: Batches built to the shares (`quotas`) or cut to them (`cut`).
        self.shared_batches = 0
        #: Batches with two or more partitions waiting taken whole: within every share (`cut`).
        self.whole_batches = 0

    def report(self, event_ns: Mapping[TP, int], offsets: Mapping[TP, int] | None = None) -> None:
        """The event times the partitions reached with the last processed batch (and its last offsets)."""
        if event_ns:
            self.event_ns.update(event_ns)
            self.exempt.difference_update(event_ns)
        if offsets:
            for tp, ts in event_ns.items():
                offset = offsets.get(tp)
                if offset is None:
                    continue
                last = self._last.get(tp)
                self._last[tp] = (offset, ts)
                if last is not None and offset > last[0] and ts >= last[1]:
                    step = (ts - last[1]) / (offset - last[0])
                    prev = self.step_ns.get(tp)
                    self.step_ns[tp] = step if prev is None else (prev + step) / 2

    def quotas(self, size: int) -> dict[TP, int] | None:
        """Records per partition in a batch of `size`; None (fewer than two waiting): the holds decide.

        While two or more partitions have records waiting, the batch is filled up to one event-time
        level: each waiting partition below the level gets the records that bring it there (in
        proportion to its records per event-time ns; the mean estimate stands in for a partition
        without one yet), a partition above it gets none. So one batch advances every partition to
        about the same event time, whatever their record rates. Until every waiting partition has
        an event time and one of them an estimate (the first batches), the shares are equal.
        """
        if len(self.waiting) < 2:
            return None
        self.shared_batches += 1
        return self._shares(size)

    def cut(self, size: int, first: Mapping[TP, int], last: Mapping[TP, int]) -> dict[TP, int] | None:
        """The shares a batch consumed whole must be cut to; None when they would not change it.

        `first`/`last` are the batch's first and last offset per partition (their difference + 1
        bounds its records of the partition). None also with fewer than two partitions waiting. A
        batch within every share counts in `whole_batches` (with a live feed most batches: they
        hold every record fetched, far below the level), one to cut in `shared_batches`.
        """
        if len(self.waiting) < 2:
            return None
        shares = self._shares(size)
        if all(end - first[tp] < shares.get(tp, 0) for tp, end in last.items()):
            self.whole_batches += 1
            return None
        self.shared_batches += 1
        return shares

    def _shares(self, size: int) -> dict[TP, int]:
        """`quotas` of two or more waiting partitions (nothing counted)."""
        waiting = self.waiting
        known = [self.step_ns[tp] for tp in waiting if self.step_ns.get(tp)]
        if not known or any(tp not in self.event_ns for tp in waiting):
            share = max(1, size // len(waiting))
            return dict.fromkeys(waiting, share)
        mean = sum(known) / len(known)
        parts = sorted(waiting, key=lambda tp: self.event_ns[tp])
        rates = {tp: 1 / max(self.step_ns.get(tp) or mean, 1.0) for tp in parts}
        level = 0.0
        weighted = rate_sum = 0.0
        for i, tp in enumerate(parts):
            weighted += self.event_ns[tp] * rates[tp]
            rate_sum += rates[tp]
            level = (size + weighted) / rate_sum
            if i + 1 == len(parts) or level <= self.event_ns[parts[i + 1]]:
                break
        return {tp: max(0, int((level - self.event_ns[tp]) * rates[tp])) for tp in parts}

    def rewound(self) -> None:
        """Every partition went back to its committed offset (rolled-back cycle).

        The event times and holds stay: only committed cycles report event times, so they are the
        event times of the last committed records, right where consumption starts again. (Clearing
        them let the first batch after the rewind, possibly of the partition furthest ahead alone,
        run before the others had reported: one batch beyond the bound.)
        """

    def assigned(self, partitions: Iterable[TP]) -> None:
        """Newly assigned partitions count as waiting until the next decision (equal first shares)."""
        self.waiting = self.waiting.union(partitions)

    def forget(self, partitions: Iterable[TP]) -> None:
        """Partitions left the assignment (their pause went with them)."""
        for tp in partitions:
            self.event_ns.pop(tp, None)
            self.paused.pop(tp, None)
            self._interval.pop(tp, None)
            self.exempt.discard(tp)
            self.step_ns.pop(tp, None)
            self._last.pop(tp, None)
        self.waiting = self.waiting.difference(partitions)

    def needs_check(self, assigned: Collection[TP]) -> bool:
        """Whether a decision could change anything (cheap; avoids lag look-ups in the common case)."""
        if self.paused or len(self.waiting) > 1:
            return True
        if not self.event_ns:
            return False
        if len(self.event_ns) < len(assigned):
            return True
        values = self.event_ns.values()
        return max(values) - min(values) > self.max_ahead_ns

    def decide(self, waiting: Collection[TP], now_ns: int) -> Decision:
        """Pause/resume given the partitions with records waiting; updates the pause state."""
        self.waiting = frozenset(waiting)
        front = frontier(self.event_ns, waiting)
        wanted = ahead_partitions(self.event_ns, waiting, self.paused, self.max_ahead_ns)
        wanted -= self.exempt
        for tp in self.paused:
            if tp in wanted and self._starved(tp, front, now_ns):
                wanted.discard(tp)
                self.exempt.add(tp)
                self.guard_resumes += 1
        resume = frozenset(tp for tp in self.paused if tp not in wanted)
        pause = frozenset(tp for tp in wanted if tp not in self.paused)
        for tp in resume:
            del self.paused[tp]
            self._interval.pop(tp, None)
        for tp in pause:
            self.paused[tp] = now_ns
            self._interval[tp] = (now_ns, front)
        self.pauses += len(pause)
        return Decision(pause=pause, resume=resume)

    def _starved(self, tp: TP, front: int | None, now_ns: int) -> bool:
        """Whether the guard lets `tp` through: its guard interval is over and the frontier was slow.

        Each interval lasts `max_pause_ns`; one in which the frontier advanced at least
        `CATCH_UP_RATE` times the wall time starts the next one (the hold goes on). A frontier
        that is or was unknown counts as not advancing.
        """
        started, front0 = self._interval.get(tp, (self.paused[tp], None))
        elapsed = now_ns - started
        if elapsed <= self.max_pause_ns:
            return False
        if (front is None or front0 is None or front == UNKNOWN or front0 == UNKNOWN
                or front - front0 < CATCH_UP_RATE * elapsed):
            return True
        self._interval[tp] = (now_ns, front)
        return False

    def held(self) -> frozenset[TP]:
        """Partitions currently paused by the alignment (other pauses must not resume them)."""
        return frozenset(self.paused)


class HeldRecords:
    """Records of the partitions the alignment holds back, in offset order per partition.

    A partition's records go to its buffer while it is held and, after its release, while earlier
    records of it are still buffered (per-partition order). `max_records`/`max_bytes` bound one
    partition's buffer: past either, the partition is to be paused in the client (`bound_changes`)
    until its buffer is below half of both.
    """

    def __init__(self, max_records: int, max_bytes: int) -> None:
        """Bounds of one partition's buffer (records, key + value bytes), both > 0."""
        if max_records <= 0 or max_bytes <= 0:
            raise ValueError("the bounds must be positive")
        self.max_records = max_records
        self.max_bytes = max_bytes
        self._buffers: dict[TP, deque[InRecord]] = {}
        self._bytes: dict[TP, int] = {}
        #: Partitions paused in the client because their buffer passed the bound.
        self.paused: set[TP] = set()
        #: Partitions paused in the client so far (each pause counts 1).
        self.client_pauses = 0

    def __len__(self) -> int:
        """Records held, all partitions."""
        return sum(len(buf) for buf in self._buffers.values())

    def active(self) -> bool:
        """Whether anything is held or paused in the client."""
        return bool(self._buffers) or bool(self.paused)

    def waiting(self) -> set[TP]:
        """Partitions with held records."""
        return set(self._buffers)

    def size(self, tp: TP) -> int:
        """Records held of `tp`."""
        buf = self._buffers.get(tp)
        return len(buf) if buf is not None else 0

    def route(self, records: list[InRecord], holding: Collection[TP],
              quota: Quota | None = None) -> list[InRecord]:
        """The records to process now; the others are kept.

        Kept: records of held partitions, of partitions with earlier records held, and past their
        partition's `quota` in this batch. `records` are freshly consumed, in consumption order.
        """
        buffers = self._buffers
        if not holding and not buffers and quota is None:
            return records
        ready: list[InRecord] = []
        sizes = self._bytes
        for rec in records:
            tp = (rec.topic, rec.partition)
            if tp in holding or tp in buffers or (quota is not None and not quota.take(tp)):
                buf = buffers.get(tp)
                if buf is None:
                    buf = buffers[tp] = deque()
                    sizes[tp] = 0
                buf.append(rec)
                sizes[tp] += _size(rec)
            else:
                ready.append(rec)
        return ready

    def release(self, holding: Collection[TP], limit: int, quota: Quota | None = None) -> list[InRecord]:
        """Up to `limit` held records of partitions no longer held, oldest first per partition.

        With a `quota`, each partition within it (and the quota charged).
        """
        out: list[InRecord] = []
        for tp in sorted(self._buffers):
            if len(out) >= limit:
                break
            if tp in holding:
                continue
            buf = self._buffers[tp]
            freed = 0
            before = len(out)
            end = limit if quota is None else before + min(limit - before, quota.room(tp))
            while buf and len(out) < end:
                rec = buf.popleft()
                freed += _size(rec)
                out.append(rec)
            self._bytes[tp] -= freed
            if quota is not None:
                quota.used(tp, len(out) - before)
            if not buf:
                del self._buffers[tp], self._bytes[tp]
        return out

    def bound_changes(self) -> tuple[frozenset[TP], frozenset[TP]]:
        """Partitions to pause and to resume in the client now, per the bounds; updates `paused`."""
        pause = frozenset(
            tp for tp, buf in self._buffers.items()
            if tp not in self.paused and (len(buf) >= self.max_records or self._bytes[tp] >= self.max_bytes))
        resume = frozenset(
            tp for tp in self.paused
            if self.size(tp) < self.max_records // 2 and self._bytes.get(tp, 0) < self.max_bytes // 2)
        self.paused.difference_update(resume)
        self.paused.update(pause)
        self.client_pauses += len(pause)
        return pause, resume

    def drop(self, partitions: Iterable[TP] | None = None) -> dict[TP, int]:
        """Forget the held records (of `partitions`, default all); the first dropped offset per partition.

        The caller seeks each partition that stays assigned back to that offset (or to an earlier one,
        e.g. the committed offset), so the dropped records are read again.
        """
        tps = list(self._buffers) if partitions is None else [tp for tp in partitions if tp in self._buffers]
        first = {}
        for tp in tps:
            buf = self._buffers.pop(tp)
            self._bytes.pop(tp, None)
            if buf:
                first[tp] = buf[0].offset
        return first

    def forget(self, partitions: Iterable[TP]) -> None:
        """Partitions left the assignment: their records and client pause go with them."""
        parts = list(partitions)
        self.drop(parts)
        self.paused.difference_update(parts)


class Quota:
    """Records each partition may still add to the batch being built (`Alignment.quotas`)."""

    __slots__ = ("_floor", "_left")

    def __init__(self, quotas: Mapping[TP, int]) -> None:
        """`quotas` per partition; a partition not in it (nothing waiting at the decision) gets none."""
        self._left = dict(quotas)
        self._floor = 0

    def room(self, tp: TP) -> int:
        """Records `tp` may still add."""
        return self._left.get(tp, self._floor)

    def used(self, tp: TP, n: int) -> None:
        """`tp` added `n` records."""
        self._left[tp] = self.room(tp) - n

    def closed(self) -> frozenset[TP]:
        """Partitions without a share in this batch (to be held)."""
        return frozenset(tp for tp, left in self._left.items() if left <= 0)

    def take(self, tp: TP) -> bool:
        """One more record of `tp` if its quota allows (counted), else False."""
        left = self._left.get(tp, self._floor)
        if left <= 0:
            return False
        self._left[tp] = left - 1
        return True


def _size(rec: InRecord) -> int:
    return len(rec.value or b"") + len(rec.key or b"")
