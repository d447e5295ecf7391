-- The relay reads only unpublished rows, but published ones stay for the retention
-- period (60 s by default): without this index each fetch scanned all of them, which
-- under load was most of the order database's work.
CREATE INDEX outbox_unpublished ON outbox (global_position) WHERE published_at IS NULL;
