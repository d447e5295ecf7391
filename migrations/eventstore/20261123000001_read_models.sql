-- Read models (DESIGN §5), and the records that make HTTP commands idempotent.
--
-- One migration chain serves every service database, so each database has every
-- read-model table; a service writes and reads only its own. Every row keeps the
-- stream version it reflects (what read-your-writes compares) and the global position
-- of the last event applied to it (what projection lag is measured from).

-- Order service: one row per order.
CREATE TABLE order_summaries (
    order_id               UUID        PRIMARY KEY,
    customer_id            UUID        NOT NULL,
    status                 TEXT        NOT NULL,
    lines                  JSONB       NOT NULL,
    total_cents            BIGINT      NOT NULL,
    currency               TEXT        NOT NULL,
    reason                 TEXT,
    cancellation_requested BOOLEAN     NOT NULL DEFAULT false,
    -- The conversation the order's latest event belongs to (x-correlation-id).
    correlation_id         UUID        NOT NULL,
    version                BIGINT      NOT NULL,
    position               BIGINT      NOT NULL,
    placed_at              TIMESTAMPTZ NOT NULL,
    updated_at             TIMESTAMPTZ NOT NULL
);

-- Order service: a customer's orders, newest first.
CREATE TABLE customer_orders (
    customer_id UUID        NOT NULL,
    order_id    UUID        NOT NULL,
    status      TEXT        NOT NULL,
    total_cents BIGINT      NOT NULL,
    currency    TEXT        NOT NULL,
    reason      TEXT,
    version     BIGINT      NOT NULL,
    position    BIGINT      NOT NULL,
    placed_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (customer_id, order_id)
);
CREATE INDEX customer_orders_newest ON customer_orders (customer_id, placed_at DESC);

-- Inventory service: one row per stock item.
CREATE TABLE stock_levels (
    sku        TEXT        PRIMARY KEY,
    name       TEXT        NOT NULL,
    available  BIGINT      NOT NULL,
    reserved   BIGINT      NOT NULL,
    sold       BIGINT      NOT NULL,
    version    BIGINT      NOT NULL,
    position   BIGINT      NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Payment service: one row per order's payment.
CREATE TABLE payment_statuses (
    order_id     UUID        PRIMARY KEY,
    status       TEXT        NOT NULL,
    amount_cents BIGINT      NOT NULL,
    version      BIGINT      NOT NULL,
    position     BIGINT      NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL
);

-- An HTTP command sent with an Idempotency-Key, and the response it got. Written in
-- the transaction that stores the command's events, so a key is recorded exactly when
-- its effect is; a repeat of the key with the same request gets this response again.
CREATE TABLE idempotency_keys (
    key          TEXT        PRIMARY KEY,
    -- Method, path and body as received: the same key with another request is refused.
    request      BYTEA       NOT NULL,
    status       SMALLINT    NOT NULL,
    body         JSONB       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
