-- The database of the market-data tables. Every ClickHouse migration runs unchanged on chDB (local)
-- and on a server; `{{database}}` and other `{{...}}` values come from the migrations runner.
CREATE DATABASE IF NOT EXISTS {{database}};
