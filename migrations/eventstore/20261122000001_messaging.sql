-- Messages in flight: the outbox learns to carry commands and to remember what it
-- published, and consumers get an inbox, a per-stream checkpoint and parked streams.

-- A published row is marked, not deleted, so an operator can still see what went out
-- recently; the relay deletes marked rows on a schedule. The relay finds unpublished
-- rows through the primary key from a cursor (everything below it is published), so
-- published_at needs no index, and with room left in each page the mark is a HOT
-- update that touches no index at all.
ALTER TABLE outbox ADD COLUMN published_at TIMESTAMPTZ;
ALTER TABLE outbox SET (fillfactor = 70);

-- A command one service sends another travels in the outbox row itself (an event row
-- leaves these NULL and is joined to `events`). Its position comes from the same
-- (transaction id << 20) + ordinal space as events, so events and commands of one
-- transaction go out in the order they were written.
ALTER TABLE outbox
    ADD COLUMN message_id         UUID,
    ADD COLUMN message_type       TEXT,
    ADD COLUMN target_service     TEXT,
    -- Commands with one ordering key are handled one at a time, in order.
    ADD COLUMN ordering_key       TEXT,
    ADD COLUMN schema_fingerprint BIGINT,
    ADD COLUMN payload            BYTEA,
    ADD COLUMN correlation_id     UUID,
    ADD COLUMN causation_id       UUID,
    ADD CONSTRAINT outbox_command_complete CHECK (
        (message_id IS NULL AND message_type IS NULL AND target_service IS NULL
            AND ordering_key IS NULL AND schema_fingerprint IS NULL AND payload IS NULL
            AND correlation_id IS NULL AND causation_id IS NULL)
        OR (message_id IS NOT NULL AND message_type IS NOT NULL AND target_service IS NOT NULL
            AND ordering_key IS NOT NULL AND schema_fingerprint IS NOT NULL
            AND payload IS NOT NULL AND correlation_id IS NOT NULL AND causation_id IS NOT NULL)
    );

-- Messages a consumer has applied, written in the same transaction as the effect: a
-- second delivery of the same message finds its row and changes nothing.
CREATE TABLE inbox (
    consumer   TEXT        NOT NULL,
    message_id UUID        NOT NULL,
    handled_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- The last stream version each consumer applied per stream: an event older than that
-- which is not a duplicate arrived out of order and is dead-lettered, never applied.
CREATE TABLE consumer_streams (
    consumer     TEXT   NOT NULL,
    stream_id    TEXT   NOT NULL,
    last_version BIGINT NOT NULL,
    PRIMARY KEY (consumer, stream_id)
);

-- A stream whose message was dead-lettered: its later messages wait in the dead-letter
-- queue behind it, so nothing of the stream is applied ahead of the failed message.
-- blocking_message_id is the one message the stream lets through: the dead letter
-- first, and once that is applied (replayed) or skipped, each parked message in turn.
CREATE TABLE parked_streams (
    consumer            TEXT        NOT NULL,
    stream_id           TEXT        NOT NULL,
    blocking_message_id UUID        NOT NULL,
    error               TEXT        NOT NULL,
    parked_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, stream_id)
);

-- The messages parked behind a stream's dead letter, in the order they arrived; they
-- are let through one at a time, in this order.
CREATE TABLE parked_messages (
    seq        BIGSERIAL PRIMARY KEY,
    consumer   TEXT NOT NULL,
    stream_id  TEXT NOT NULL,
    message_id UUID NOT NULL,
    UNIQUE (consumer, message_id)
);
CREATE INDEX parked_messages_by_stream ON parked_messages (consumer, stream_id, seq);
