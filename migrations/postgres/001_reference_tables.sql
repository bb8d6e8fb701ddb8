-- Reference data of the contract (database `reference_data`): venues and instruments.
-- Enrichment resolves a tick's (venue, symbol) against instruments (venue, venue_symbol).
-- `updated_at` is kept by a trigger on every change; it is not part of a change's meaning.

CREATE TABLE IF NOT EXISTS venues (
    mic        text PRIMARY KEY,
    name       text NOT NULL,
    timezone   text NOT NULL DEFAULT 'UTC',
    active     boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT venues_mic_upper CHECK (mic = upper(btrim(mic)) AND mic <> '')
);

CREATE TABLE IF NOT EXISTS instruments (
    instrument_id text PRIMARY KEY,
    venue         text NOT NULL REFERENCES venues (mic) ON UPDATE CASCADE,
    venue_symbol  text NOT NULL,
    symbol        text NOT NULL,
    asset_class   text NOT NULL,
    currency      char(3) NOT NULL,
    tick_size     numeric NOT NULL DEFAULT 0.01,
    multiplier    numeric NOT NULL DEFAULT 1,
    active        boolean NOT NULL DEFAULT true,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT instruments_venue_symbol_key UNIQUE (venue, venue_symbol),
    CONSTRAINT instruments_venue_symbol_upper CHECK (venue_symbol = upper(btrim(venue_symbol)) AND venue_symbol <> ''),
    CONSTRAINT instruments_currency_upper CHECK (currency = upper(currency)),
    CONSTRAINT instruments_tick_size_positive CHECK (tick_size > 0),
    CONSTRAINT instruments_multiplier_positive CHECK (multiplier > 0)
);

CREATE INDEX IF NOT EXISTS instruments_symbol_idx ON instruments (symbol);

CREATE OR REPLACE FUNCTION touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS venues_touch ON venues;
CREATE TRIGGER venues_touch BEFORE UPDATE ON venues
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();

DROP TRIGGER IF EXISTS instruments_touch ON instruments;
CREATE TRIGGER instruments_touch BEFORE UPDATE ON instruments
    FOR EACH ROW EXECUTE FUNCTION touch_updated_at();
