-- Distributed tracing: the W3C `traceparent` of the span that wrote an event or queued
-- a command, so the relay can carry it in the AMQP headers and a replay, a rebuild or
-- `orderflow trace` can link back to the request's trace. NULL for a writer that was
-- not traced (and for every row written before this migration). Adding a nullable
-- column without a default rewrites nothing.
ALTER TABLE events ADD COLUMN traceparent TEXT;
ALTER TABLE outbox ADD COLUMN traceparent TEXT;
-- A saga remembers the span of its last step, so a deadline that fires later (a
-- payment that never answered) continues the order's trace.
ALTER TABLE sagas ADD COLUMN traceparent TEXT;
-- A notification is sent after the transaction that planned it, by the channel's
-- sender loop: it continues the trace of the event that planned it.
ALTER TABLE notifications ADD COLUMN traceparent TEXT;
