-- Small parts in one file: every insert of the services (a transaction's bars or late trades, a batch
-- of audit events) is a few hundred KiB at most, and writing it as a "full" part (a folder of a dozen
-- files) cost ~6 ms of CPU per insert in the engine. Below 1 MiB (uncompressed) a part is written
-- "packed" (one file); merges past that size write full parts as before. Same rows, same reads.
-- MODIFY SETTING is idempotent: a run cut short is finished by the next.
ALTER TABLE {{database}}.bars MODIFY SETTING min_bytes_for_full_part_storage = 1048576;
ALTER TABLE {{database}}.late_trades MODIFY SETTING min_bytes_for_full_part_storage = 1048576;
ALTER TABLE {{database}}.audit_events MODIFY SETTING min_bytes_for_full_part_storage = 1048576;
