-- OHLCV bars written by aggregation. One row per emission; `version` grows with every change of a bar,
-- so `SELECT ... FINAL` (ReplacingMergeTree(version)) shows exactly one row per bar: its latest.
-- `non_replicated_deduplication_window` makes a retried insert with the same dedup token a no-op.
CREATE TABLE IF NOT EXISTS {{database}}.bars
(
    instrument_id    LowCardinality(String),
    interval         LowCardinality(String),
    window_start     DateTime64(3, 'UTC'),
    window_end       DateTime64(3, 'UTC'),
    venue            LowCardinality(String),
    symbol           LowCardinality(String),
    currency         LowCardinality(String),
    open             Float64,
    high             Float64,
    low              Float64,
    close            Float64,
    volume           Float64,
    vwap             Float64,
    trade_count      UInt32,
    is_final         UInt8,
    version          UInt64,
    first_trade_ts   DateTime64(9, 'UTC'),
    last_trade_ts    DateTime64(9, 'UTC'),
    source_partition Int32,
    offset_from      Int64,
    offset_to        Int64,
    emitted_at       DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (instrument_id, interval, window_start)
SETTINGS non_replicated_deduplication_window = 1000;
