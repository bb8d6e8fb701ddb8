"""Hostile input for the raw-tick path: seeded fuzzing of the real normalization transform.

    uv run python -m dptools.fuzz --count 100000 --seed 1     # the report run
    uv run python -m dptools.fuzz --count 5000                 # quick look

A plain seeded generator mixes valid ticks with random bytes, deep and huge JSON, wrong types,
unicode oddities (lone surrogates, NUL, bidi and zero-width characters, invalid UTF-8), extreme numbers
(1e309, 400-digit integers, NaN/Infinity literals, huge exponents), missing and duplicated fields and
mutations of valid ticks. Every message goes through the real `Normalizer` (the same object the
service runs, with the real Avro encoder and partitioner) in batches; each one must come out as
exactly one of: a normalized tick (whose Avro bytes decode again), a dead letter with a reason, or a
dropped duplicate. Nothing may raise. RSS is sampled along the way: the growth after warm-up must
stay under a bound (the dedup memory is capped, nothing else may accumulate).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dataproc_shared import avro
from dataproc_shared.partitioning import partition_for
from dataproc_shared.records import InRecord

from dptools.pipeline import REPO

SCHEMA = "normalized_tick"
VENUES = ("XNYS", "XNAS", "BINANCE", "XCEC", "EPEX", "OANDA", "xnys", " XNYS ", "")
WEIRD_STRINGS = (
    "\u0000", "\ud800", "\udfff", "\u202e", "\u200b", "\ufeff", "\uffff", "A\u0301", "🚀" * 50,
    "é" * 3, "\\u0000", "X" * 10_000, "../../etc/passwd", "'; DROP TABLE instruments; --", "%s%n%x",
    "\r\n", "\t", "\uff29\uff22\uff2d", "İ", "ß",
)
EXTREME_NUMBERS = (
    "1e309", "-1e309", "1e-400", "NaN", "Infinity", "-Infinity", "-0", "0", "1" * 400, "-" + "9" * 400,
    "1e999999999", "4.9e-324", "1.7976931348623157e308", "9223372036854775808", "-9223372036854775809",
    "0x10", "1_000", "+5", ".5", "5.", "1e", "--1", "١٢٣",
)


@dataclass(frozen=True)
class FuzzCase:
    """One generated message and the family it belongs to."""

    family: str
    key: bytes | None
    value: bytes | None


def _valid(rng: random.Random, i: int) -> dict[str, Any]:
    trade = rng.random() < 0.6
    ts = 1_763_900_000_000 + i
    body: dict[str, Any] = {"venue": rng.choice(VENUES[:6]), "symbol": rng.choice(("IBM", "BTCUSDT", "GCZ3")),
                            "type": "trade" if trade else "quote", "ts": ts}
    if trade:
        body.update(price=round(rng.uniform(1, 1000), 2), size=rng.randint(1, 100),
                    trade_id=f"F{rng.randint(0, 5000)}", seq=i)
    else:
        body.update(bid=100.0, ask=100.1, bid_size=1, ask_size=2)
    return body


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice((True, False))
    if choice == 2:
        return rng.randint(-(2**70), 2**70)
    if choice == 3:
        return rng.choice((rng.uniform(-1e300, 1e300), float("1e308") * rng.choice((1, -1)), -0.0, 1e-320))
    if choice == 4:
        return rng.choice(WEIRD_STRINGS)
    if choice == 5:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 20)))
    if choice == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if choice == 7:
        names = ("price", "ts", "x", "")
        return {rng.choice(names): _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return rng.choice(EXTREME_NUMBERS)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")


def cases(count: int, seed: int) -> Iterator[FuzzCase]:
    """`count` hostile (and some valid) messages, seeded and repeatable."""
    rng = random.Random(seed)
    fields = ("venue", "symbol", "type", "ts", "price", "size", "trade_id", "seq", "bid", "ask",
              "bid_size", "ask_size")
    for i in range(count):
        family = rng.choice(("valid", "random_bytes", "deep_json", "huge_json", "wrong_type", "unicode",
                             "extreme_number", "missing_field", "mutated", "raw_number_literal", "not_object",
                             "duplicate_keys", "truncated"))
        body = _valid(rng, i)
        key: bytes | None = f"{body['venue']}:{body['symbol']}".encode()
        value: bytes | None
        if family == "valid":
            value = _dumps(body)
        elif family == "random_bytes":
            value = rng.randbytes(rng.randrange(0, 300)) if rng.random() < 0.95 else None
            key = rng.randbytes(rng.randrange(0, 40)) if rng.random() < 0.5 else None
        elif family == "deep_json":
            depth = rng.choice((50, 500, 5_000, 100_000))
            opener, closer = rng.choice((("[", "]"), ('{"a":', "}")))
            value = (opener * depth + "1" + closer * depth).encode()
        elif family == "huge_json":
            size = rng.choice((10_000, 200_000, 1_000_000))
            body[rng.choice(fields)] = "x" * size if rng.random() < 0.5 else list(range(size // 8))
            value = _dumps(body)
        elif family == "wrong_type":
            body[rng.choice(fields)] = _random_value(rng)
            value = _dumps(body)
        elif family == "unicode":
            body[rng.choice(("venue", "symbol", "trade_id", "type"))] = rng.choice(WEIRD_STRINGS)
            value = _dumps(body)
            if rng.random() < 0.3:  # invalid UTF-8 spliced in
                value = value.replace(b'"', b'"\xff\xfe', 1)
        elif family == "extreme_number":
            name = rng.choice(("price", "size", "ts", "seq", "bid", "ask", "bid_size", "ask_size"))
            raw = rng.choice(EXTREME_NUMBERS)
            as_string = rng.random() < 0.5
            body[name] = "@@N@@"
            value = _dumps(body).replace(b'"@@N@@"', (json.dumps(raw) if as_string else raw).encode())
        elif family == "missing_field":
            for name in rng.sample(sorted(body), rng.randrange(1, 3)):
                del body[name]
            value = _dumps(body)
        elif family == "mutated":
            buf = bytearray(_dumps(body))
            for _ in range(rng.randrange(1, 6)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            value = bytes(buf)
        elif family == "raw_number_literal":
            value = rng.choice((b"NaN", b"Infinity", b"1e309", b"null", b"true", b'"str"', b"[]", b"{}", b""))
        elif family == "not_object":
            value = _dumps(rng.choice(([body], [[body]], "tick", 42, None)))
        elif family == "duplicate_keys":
            text = _dumps(body).decode("utf-8", "surrogatepass")
            value = (text[:-1] + ', "price": "x", "ts": -1}').encode("utf-8", "surrogatepass")
        else:  # truncated
            data = _dumps(body)
            value = data[: rng.randrange(len(data))]
        yield FuzzCase(family, key, value)


def _sane(tick: dict[str, Any]) -> bool:
    names = ("price", "size", "bid", "ask", "bid_size", "ask_size")
    numbers = [tick[n] for n in names if tick.get(n) is not None]
    if not all(math.isfinite(v) for v in numbers):
        return False
    if not 0 < tick["ts_ns"] < 2**63:
        return False
    return bool(tick["venue"]) and bool(tick["symbol"])


def rss_mib() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class FuzzReport:
    """What a fuzzing run found."""

    count: int
    seed: int
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    by_family: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)
    unaccounted: int = 0
    #: normalized ticks with a non-finite number, a non-positive price/size of a trade or a bad time
    insane_outputs: list[str] = field(default_factory=list)
    bad_avro: int = 0
    rss_mib_start: float = 0.0
    rss_mib_after_warmup: float = 0.0
    rss_mib_end: float = 0.0
    peak_rss_mib: float = 0.0
    rss_bound_mib: float = 64.0

    @property
    def rss_growth_mib(self) -> float:
        """RSS growth from the end of warm-up (first 10%) to the end."""
        return self.rss_mib_end - self.rss_mib_after_warmup

    @property
    def ok(self) -> bool:
        """No crash, every message accounted for, valid Avro out, memory within the bound."""
        return (not self.crashes and self.unaccounted == 0 and self.bad_avro == 0 and not self.insane_outputs
                and self.rss_growth_mib < self.rss_bound_mib)


def run(count: int, seed: int, batch_size: int = 200, partitions: int = 3) -> FuzzReport:
    """Fuzz the real normalization transform with `count` messages; never raises on a finding."""
    from normalization.codec import tick_encoder
    from normalization.transform import Normalizer, NormalizerConfig

    report = FuzzReport(count=count, seed=seed, rss_mib_start=rss_mib())
    normalizer = Normalizer(
        NormalizerConfig(output_topic="fuzz.normalized", output_partitions=partitions),
        encode=tick_encoder(), partitioner=partition_for, clock=time.time_ns,
    )
    outcomes: Counter[str] = Counter()
    families: dict[str, Counter[str]] = {}
    reasons: Counter[str] = Counter()
    batch: list[tuple[InRecord, str]] = []
    started = time.monotonic()
    warmup = max(1, count // 10)
    offsets = [0] * partitions

    def flush() -> None:
        records = [r for r, _ in batch]
        try:
            result = normalizer.process(records)
        except Exception as exc:
            report.crashes.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            outcomes["crashed"] += len(records)
            batch.clear()
            return
        handled = len(result.outputs) + len(result.dead_letters) + result.deduplicated
        report.unaccounted += abs(len(records) - handled)
        for out in result.outputs:
            try:
                avro.decode(out.value or b"", SCHEMA)
            except Exception:
                report.bad_avro += 1
        for dead in result.dead_letters:
            reasons[str(dead.reason)] += 1
        outcomes["normalized"] += len(result.outputs)
        outcomes["dead_lettered"] += len(result.dead_letters)
        outcomes["deduplicated"] += result.deduplicated
        # per family: the transform keeps order, so outcomes are attributed through lineage offsets
        dead_offsets = {(d.source.partition, d.source.offset) for d in result.dead_letters}
        out_offsets = set()
        for out in result.outputs:
            decoded = avro.decode(out.value or b"", SCHEMA)
            out_offsets.add((decoded["source_partition"], decoded["source_offset"]))
            if not _sane(decoded):
                report.insane_outputs.append(json.dumps(decoded, default=str)[:300])
        for rec, family in batch:
            ident = (rec.partition, rec.offset)
            kind = "normalized" if ident in out_offsets else "dead_lettered" if ident in dead_offsets \
                else "deduplicated"
            families.setdefault(family, Counter())[kind] += 1
        batch.clear()

    for i, case in enumerate(cases(count, seed)):
        part = i % partitions
        rec = InRecord(topic="fuzz.raw", partition=part, offset=offsets[part], key=case.key, value=case.value,
                       timestamp_ms=int(time.time() * 1000), headers=())
        offsets[part] += 1
        batch.append((rec, case.family))
        if len(batch) >= batch_size:
            flush()
        if i + 1 == warmup:
            report.rss_mib_after_warmup = rss_mib()
    if batch:
        flush()
    report.seconds = round(time.monotonic() - started, 1)
    report.rss_mib_end = rss_mib()
    report.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report.outcomes = dict(outcomes)
    report.by_family = {k: dict(v) for k, v in sorted(families.items())}
    report.dead_letter_reasons = dict(reasons)
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m dptools.fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args.count, args.seed)
    data = asdict(report) | {"ok": report.ok, "rss_growth_mib": round(report.rss_growth_mib, 1)}
    print(json.dumps(data, indent=2))
    path = args.json or REPO / "bench-results" / f"fuzz-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
