-- Notification service: what it knows of each user, from the user service's events
-- (it never reads the user database).
CREATE TABLE notification_recipients (
    user_id      UUID    PRIMARY KEY,
    email        TEXT,
    name         TEXT,
    notify_email BOOLEAN NOT NULL,
    notify_sms   BOOLEAN NOT NULL,
    notify_push  BOOLEAN NOT NULL,
    version      BIGINT  NOT NULL
);

-- Every notification decided: one per triggering event and channel (the unique key),
-- written in the transaction that consumes the event. A sender delivers the pending
-- ones through the channel's provider and records when it did (`sent_at`).
CREATE TABLE notifications (
    notification_id  UUID        PRIMARY KEY,
    trigger_event_id UUID        NOT NULL,
    user_id          UUID        NOT NULL,
    order_id         UUID,
    channel          TEXT        NOT NULL,
    kind             TEXT        NOT NULL,
    message          TEXT        NOT NULL,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    attempts         INT         NOT NULL DEFAULT 0,
    last_error       TEXT,
    -- When a sender may try it (next): also a lease while one is trying.
    next_attempt_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at          TIMESTAMPTZ,
    UNIQUE (trigger_event_id, channel)
);
CREATE INDEX notifications_pending ON notifications (next_attempt_at) WHERE sent_at IS NULL;
CREATE INDEX notifications_by_user ON notifications (user_id, created_at DESC);
