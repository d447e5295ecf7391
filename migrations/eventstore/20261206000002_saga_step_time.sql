-- When a saga entered the step it is in: the time spent in a step is observed
-- (`orderflow_saga_step_seconds`) as the saga leaves it. Existing rows count from now.
ALTER TABLE sagas ADD COLUMN step_entered_at TIMESTAMPTZ NOT NULL DEFAULT now();
