-- The event store every service database holds. Only the `eventstore` crate reads or
-- writes these tables.

-- Events at rest.
--
-- global_position is (writing transaction id << 20) + ordinal within that transaction,
-- not a sequence value. A sequence hands out numbers before commit, so a reader that
-- remembers "everything up to P" could skip a transaction that took a lower number but
-- committed later. Deriving the position from pg_current_xact_id() makes "position
-- order" the same as "transaction id order", and a reader that only reads positions
-- below pg_snapshot_xmin(pg_current_snapshot()) << 20 never sees an event while an
-- older-or-equal transaction could still commit one before it. See ARCHITECTURE.md.
CREATE TABLE events (
    global_position    BIGINT      PRIMARY KEY,
    stream_id          TEXT        NOT NULL,
    stream_version     BIGINT      NOT NULL CHECK (stream_version > 0),
    event_id           UUID        NOT NULL,
    event_type         TEXT        NOT NULL,
    schema_fingerprint BIGINT      NOT NULL,
    -- Avro single-object encoding: C3 01, the writer schema's fingerprint, the body.
    payload            BYTEA       NOT NULL,
    correlation_id     UUID        NOT NULL,
    causation_id       UUID        NOT NULL,
    recorded_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Optimistic concurrency: two writers can never both store version N of a stream.
    CONSTRAINT events_stream_version_key UNIQUE (stream_id, stream_version),
    -- Idempotency: an event id is stored once, whatever the stream.
    CONSTRAINT events_event_id_key UNIQUE (event_id)
);

-- Events waiting to be published to RabbitMQ, written in the same transaction as the
-- events themselves (never commit-then-publish). The relay deletes rows once the broker
-- confirmed them.
CREATE TABLE outbox (
    global_position BIGINT      PRIMARY KEY,
    enqueued_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Snapshots are a cache of folded state: deleting any of them at any time changes no
-- result, only how many events a load reads.
CREATE TABLE snapshots (
    stream_id      TEXT        PRIMARY KEY,
    stream_version BIGINT      NOT NULL,
    -- Which aggregate and state layout wrote it; a snapshot of another format is ignored.
    state_format   TEXT        NOT NULL,
    state          JSONB       NOT NULL,
    taken_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every Avro schema version any writer used, by fingerprint, so that a reader can
-- resolve an event written by code newer or older than itself.
CREATE TABLE schema_registry (
    fingerprint   BIGINT      PRIMARY KEY,
    event_type    TEXT        NOT NULL,
    version       INTEGER     NOT NULL,
    schema        TEXT        NOT NULL,
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (event_type, version)
);
