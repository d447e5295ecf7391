-- User service: which user an e-mail address belongs to, written in the transaction
-- that records the registration, so two users can never get one address (its primary
-- key refuses the second) and a login right after registering finds the user. An index
-- over the event store, not a read model: it is never rebuilt from events.
CREATE TABLE user_emails (
    email         TEXT        PRIMARY KEY,
    user_id       UUID        NOT NULL UNIQUE,
    registered_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- User service: one profile per user (never the password hash).
CREATE TABLE user_profiles (
    user_id        UUID        PRIMARY KEY,
    email          TEXT        NOT NULL,
    name           TEXT        NOT NULL,
    notify_email   BOOLEAN     NOT NULL,
    notify_sms     BOOLEAN     NOT NULL,
    notify_push    BOOLEAN     NOT NULL,
    version        BIGINT      NOT NULL,
    position       BIGINT      NOT NULL,
    registered_at  TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL
);
