-- Audit events of every service (the contract's columns plus a unique event id). Rows expire after
-- the configured retention (`audit_ttl_days`). ReplacingMergeTree on event_id: an event loaded twice
-- (a replayed audit topic) collapses to one row under FINAL.
CREATE TABLE IF NOT EXISTS {{database}}.audit_events
(
    event_id         String,
    event_time       DateTime64(3, 'UTC'),
    service          LowCardinality(String),
    event_type       LowCardinality(String),
    environment      LowCardinality(String),
    correlation_id   String,
    instrument       String,
    source_topic     LowCardinality(String),
    source_partition Int32,
    offset_from      Int64,
    offset_to        Int64,
    outcome          LowCardinality(String),
    reason           String,
    details          String
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(event_time)
ORDER BY (service, event_type, event_time, event_id)
TTL toDateTime(event_time) + INTERVAL {{audit_ttl_days}} DAY
SETTINGS non_replicated_deduplication_window = 1000;
