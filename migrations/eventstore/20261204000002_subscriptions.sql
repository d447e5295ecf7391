-- Subscriptions on the service's own store (projections, the saga's own events): how
-- far each has applied, by global position, committed in the same transaction as what
-- it applied. A stream whose event failed for good is parked in parked_streams and
-- parked_messages, as a consumer's is (the subscription's name in `consumer`, the
-- event id as `message_id`).
CREATE TABLE subscription_checkpoints (
    subscription TEXT        PRIMARY KEY,
    position     BIGINT      NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
