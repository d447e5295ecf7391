-- Bounded bookkeeping (DESIGN §8.8): the pruner deletes inbox rows, consumer progress
-- and idempotency keys past their retention, finding them by age through these
-- indexes rather than by reading whole tables.
ALTER TABLE consumer_streams ADD COLUMN applied_at TIMESTAMPTZ NOT NULL DEFAULT now();
CREATE INDEX inbox_by_age ON inbox (handled_at);
CREATE INDEX consumer_streams_by_age ON consumer_streams (applied_at);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);

-- Back-pressure counts the orders waiting for stock or payment (at most one past its
-- bound) through this index, which holds only those sagas.
CREATE INDEX sagas_open ON sagas ((state->>'step'))
    WHERE state->>'step' IN ('not_started', 'reserving_stock', 'authorizing_payment');
