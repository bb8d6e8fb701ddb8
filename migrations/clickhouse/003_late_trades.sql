-- Trades that arrived for an already-closed window: rejected by aggregation (and dead-lettered as
-- `late_trade`), kept here so operators can see how late the feed runs and what the bars did not count.
CREATE TABLE IF NOT EXISTS {{database}}.late_trades
(
    instrument_id    LowCardinality(String),
    interval         LowCardinality(String),
    window_start     DateTime64(3, 'UTC'),
    trade_ts         DateTime64(9, 'UTC'),
    watermark_ts     DateTime64(9, 'UTC'),
    price            Float64,
    size             Float64,
    trade_id         String,
    source_partition Int32,
    source_offset    Int64,
    rejected_at      DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(trade_ts)
ORDER BY (instrument_id, interval, source_partition, source_offset)
TTL toDateTime(rejected_at) + INTERVAL {{audit_ttl_days}} DAY
SETTINGS non_replicated_deduplication_window = 1000;
