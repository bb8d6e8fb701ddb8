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
pausing and resuming every cycle), once nothing is waiting behind it, or after `max_pause_ns` of
wall time (a starvation guard: its frozen event time may come from an outlier record, e.g. a
tick stamped minutes in the future); a partition resumed by the guard is not paused again before
it has reported a new event time.

This module is pure (no client calls); `KafkaLoop` applies its decisions with `pause`/`resume`.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

TP = tuple[str, int]


#: Frontier of a waiting partition whose event time is not known yet: it holds every other one back.
UNKNOWN = -(2**63)


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
        #: Resumed by the starvation guard and not yet reported again.
        self.exempt: set[TP] = set()
        self.pauses = 0
        self.guard_resumes = 0

    def report(self, event_ns: Mapping[TP, int]) -> None:
        """The event times the partitions reached with the last processed batch."""
        if event_ns:
            self.event_ns.update(event_ns)
            self.exempt.difference_update(event_ns)

    def rewound(self) -> None:
        """Every partition went back to its committed offset (aborted cycle): event times are unknown.

        The pauses stay recorded, so the next decision resumes them; until each partition has
        reported again, the ones with records waiting hold the others back.
        """
        self.event_ns.clear()
        self.exempt.clear()

    def forget(self, partitions: Iterable[TP]) -> None:
        """Partitions left the assignment (their pause went with them)."""
        for tp in partitions:
            self.event_ns.pop(tp, None)
            self.paused.pop(tp, None)
            self.exempt.discard(tp)

    def needs_check(self, assigned: Collection[TP]) -> bool:
        """Whether a decision could change anything (cheap; avoids lag look-ups in the common case)."""
        if self.paused:
            return True
        if not self.event_ns:
            return False
        if len(self.event_ns) < len(assigned):
            return True
        values = self.event_ns.values()
        return max(values) - min(values) > self.max_ahead_ns

    def decide(self, waiting: Collection[TP], now_ns: int) -> Decision:
        """Pause/resume given the partitions with records waiting; updates the pause state."""
        wanted = ahead_partitions(self.event_ns, waiting, self.paused, self.max_ahead_ns)
        wanted -= self.exempt
        for tp, since in self.paused.items():
            if tp in wanted and now_ns - since > self.max_pause_ns:
                wanted.discard(tp)
                self.exempt.add(tp)
                self.guard_resumes += 1
        resume = frozenset(tp for tp in self.paused if tp not in wanted)
        pause = frozenset(tp for tp in wanted if tp not in self.paused)
        for tp in resume:
            del self.paused[tp]
        for tp in pause:
            self.paused[tp] = now_ns
        self.pauses += len(pause)
        return Decision(pause=pause, resume=resume)

    def held(self) -> frozenset[TP]:
        """Partitions currently paused by the alignment (other pauses must not resume them)."""
        return frozenset(self.paused)
