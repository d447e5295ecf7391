-- Process managers: one row per saga instance (the order-fulfilment saga keeps one per
-- order, keyed by the order id), with its state, its version (bumped by every input
-- that changed it) and its single pending deadline.
CREATE TABLE sagas (
    saga_id        UUID        PRIMARY KEY,
    saga_type      TEXT        NOT NULL,
    version        BIGINT      NOT NULL,
    state          JSONB       NOT NULL,
    -- When the pending deadline falls due; NULL when none is pending. The scheduler
    -- finds due sagas through the partial index below, so a deadline that fell due
    -- while the service was down fires when it comes back.
    deadline_at    TIMESTAMPTZ,
    -- Of the request that started the saga: carried into every command it sends.
    correlation_id UUID        NOT NULL,
    started_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX sagas_due ON sagas (deadline_at) WHERE deadline_at IS NOT NULL;

-- A saga's history: every input that changed it, what it sent, and where it got to.
CREATE TABLE saga_steps (
    saga_id  UUID        NOT NULL REFERENCES sagas (saga_id) ON DELETE CASCADE,
    version  BIGINT      NOT NULL,
    at       TIMESTAMPTZ NOT NULL,
    input    TEXT        NOT NULL,
    step     TEXT        NOT NULL,
    commands TEXT[]      NOT NULL,
    PRIMARY KEY (saga_id, version)
);
