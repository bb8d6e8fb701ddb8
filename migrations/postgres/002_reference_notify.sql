-- Live reference-data changes: every insert, update and delete of `venues` and `instruments` is
-- announced on the channel `reference_changes`, so the enrichment service updates its cache without
-- a restart. Notifications are delivered at commit, in commit order.
--
-- Payload (JSON text):
--   {"table": "venues"|"instruments", "op": "INSERT"|"UPDATE"|"DELETE", "key": <primary key>,
--    "row": <the new row as JSON, null for DELETE>}
--   {"table": ..., "op": "TRUNCATE"}   -- the listener reloads everything
-- An update that changes the primary key is announced as a DELETE of the old key followed by an
-- INSERT of the new one. An update that changes nothing but `updated_at` is not announced.

CREATE OR REPLACE FUNCTION reference_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    key_column text := TG_ARGV[0];
    old_key text;
    new_key text;
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        PERFORM pg_notify('reference_changes',
            json_build_object('table', TG_TABLE_NAME, 'op', 'TRUNCATE')::text);
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' AND (to_jsonb(OLD) - 'updated_at') = (to_jsonb(NEW) - 'updated_at') THEN
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_key := to_jsonb(OLD) ->> key_column;
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        new_key := to_jsonb(NEW) ->> key_column;
    END IF;
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND old_key IS DISTINCT FROM new_key) THEN
        PERFORM pg_notify('reference_changes',
            json_build_object('table', TG_TABLE_NAME, 'op', 'DELETE', 'key', old_key, 'row', NULL)::text);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND old_key IS DISTINCT FROM new_key) THEN
        PERFORM pg_notify('reference_changes',
            json_build_object('table', TG_TABLE_NAME, 'op', 'INSERT', 'key', new_key,
                              'row', to_jsonb(NEW))::text);
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM pg_notify('reference_changes',
            json_build_object('table', TG_TABLE_NAME, 'op', 'UPDATE', 'key', new_key,
                              'row', to_jsonb(NEW))::text);
    END IF;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS venues_notify ON venues;
CREATE TRIGGER venues_notify
    AFTER INSERT OR DELETE OR UPDATE ON venues
    FOR EACH ROW
    EXECUTE FUNCTION reference_notify('mic');

DROP TRIGGER IF EXISTS venues_notify_truncate ON venues;
CREATE TRIGGER venues_notify_truncate
    AFTER TRUNCATE ON venues
    FOR EACH STATEMENT
    EXECUTE FUNCTION reference_notify('mic');

DROP TRIGGER IF EXISTS instruments_notify ON instruments;
CREATE TRIGGER instruments_notify
    AFTER INSERT OR DELETE OR UPDATE ON instruments
    FOR EACH ROW
    EXECUTE FUNCTION reference_notify('instrument_id');

DROP TRIGGER IF EXISTS instruments_notify_truncate ON instruments;
CREATE TRIGGER instruments_notify_truncate
    AFTER TRUNCATE ON instruments
    FOR EACH STATEMENT
    EXECUTE FUNCTION reference_notify('instrument_id');
