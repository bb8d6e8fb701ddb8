from __future__ import annotations

import re
from pathlib import Path

from dataproc_shared.metrics import LATENCY_BUCKETS, ServiceMetrics, observe_many
from prometheus_client.parser import text_string_to_metric_families

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented() -> dict[str, tuple[str, set[str]]]:
    rows = {}
    shared_section = DOC.read_text().split("## Service-specific metrics")[0]
    for line in shared_section.splitlines():
        m = re.match(r"\|\s*`(dp_\w+)`\s*\|\s*(\w+)\s*\|\s*([^|]*)\|", line)
        if m:
            column = re.sub(r"\([^)]*\)", "", m.group(3))
            labels = {part.strip() for part in column.split(",") if part.strip()}
            rows[m.group(1)] = (m.group(2), labels)
    return rows


def exercise(m: ServiceMetrics) -> None:
    """Create one child of every family, as the runtime and services would."""
    m.record_in("t.in", 3)
    m.record_out("t.out", 2)
    m.record_dead_letter("not_json")
    m.record_duplicates(4)
    m.record_batch(10, 0.02)
    m.child(m.cycle_step_seconds, step="commit").observe(0.004)
    m.record_latencies(event_ns=1_000_000_000, ingest_ns=2_000_000_000, now_ns=3_000_000_000)
    m.set_lag("t.in", 0, 17)
    m.record_transaction("committed")
    m.record_hanging_transaction("abort")
    m.record_abandoned_producer()
    m.record_rebalance("assign")
    m.child(m.alignment_paused).set(2)
    m.child(m.alignment_pauses).inc()
    m.child(m.alignment_guard_resumes).inc()
    m.child(m.alignment_shared_batches).inc()
    m.child(m.alignment_whole_batches).inc()
    m.child(m.alignment_held_records).set(12)
    m.child(m.alignment_client_pauses).inc()
    m.child(m.audit_queue_depth).set(5)
    m.child(m.audit_dropped).inc()
    m.child(m.audit_written, sink="kafka").inc(7)
    m.child(m.audit_sink_dropped, sink="kafka").inc()
    m.set_dependency("kafka", True)
    m.heartbeat(now=1234.5)
    m.child(m.late_trades, interval="1m").inc()
    m.child(m.bars_emitted, interval="1m", final=True).inc()
    m.child(m.open_windows).set(3)
    m.child(m.clickhouse_rows_written, table="bars").inc(9)
    m.child(m.redis_writes, key_type="tick", outcome="applied").inc()
    m.child(m.reference_cache_size, table="instruments").set(100)
    m.child(m.reference_changes, table="instruments", op="update").inc()


def test_exactly_the_documented_metrics() -> None:
    expected = documented()
    assert len(expected) >= 20
    m = ServiceMetrics("aggregation")
    exercise(m)
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    seen = {}
    for fam in families.values():
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        labels = set().union(*(s.labels.keys() for s in fam.samples)) - {"le"}
        seen[name] = (fam.type, labels)
    assert seen == expected


def test_values_and_service_label() -> None:
    m = ServiceMetrics("normalization")
    exercise(m)
    text = m.render().decode()
    assert 'dp_messages_in_total{service="normalization",topic="t.in"} 3.0' in text
    assert 'dp_consumer_lag{partition="0",service="normalization",topic="t.in"} 17.0' in text
    assert 'dp_bars_emitted_total{final="true",interval="1m",service="normalization"} 1.0' in text
    assert 'dp_loop_last_tick_timestamp_seconds{service="normalization"} 1234.5' in text
    # event latency 2 s, ingest latency 1 s
    assert 'dp_event_latency_seconds_sum{service="normalization"} 2.0' in text
    assert 'dp_ingest_latency_seconds_bucket{le="1.0",service="normalization"} 1.0' in text
    assert "_created" not in text


def test_registries_are_per_service() -> None:
    a, b = ServiceMetrics("enrichment"), ServiceMetrics("projection")
    a.record_in("x")
    assert "dp_messages_in_total{" in a.render().decode()
    assert 'service="enrichment"' not in b.render().decode()


def test_forget_partition_and_custom_metric() -> None:
    m = ServiceMetrics("aggregation")
    m.set_lag("t", 1, 5)
    m.forget_partition("t", 1)
    m.forget_partition("t", 2)  # never set: no error
    assert "dp_consumer_lag{" not in m.render().decode()
    custom = m.counter("dp_audit_loader_rows_total", "Rows loaded.", ["table"])
    m.child(custom, table="audit_events").inc(2)
    assert 'dp_audit_loader_rows_total{service="aggregation",table="audit_events"} 2.0' in m.render().decode()


def test_latency_buckets_span_1ms_to_60s() -> None:
    assert LATENCY_BUCKETS[0] == 0.001
    assert LATENCY_BUCKETS[-1] == 60.0
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_observe_many_equals_one_observe_per_value() -> None:
    one, many = ServiceMetrics("one"), ServiceMetrics("one")
    values = [0.0, 0.0004, 0.001, 0.0011, 0.05, 0.05, 0.7, 3.0, 59.9, 60.0, 61.0, 1e9]
    for value in values:
        one.child(one.ingest_latency).observe(value)
    one.child(one.event_latency)
    observe_many(many.child(many.ingest_latency), values)
    observe_many(many.child(many.event_latency), [])
    assert one.render() == many.render()
    assert 'dp_ingest_latency_seconds_count{service="one"} 12.0' in many.render().decode()
