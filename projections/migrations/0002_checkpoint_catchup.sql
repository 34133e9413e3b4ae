-- Catch-up scan bookkeeping and lag (see projections/projector.py, "Catch-up scan").
-- last_event_at: the greatest `at` among the events applied so far (for `msgcore projections
--   status`: how far behind the log the tables are). Only moves forward.
-- scan_from: every event NOT yet applied has an `_id` (driver-generated ObjectId) whose time is at
--   or after scan_from minus the projector's catch-up margin; each (re)start re-reads that window of
--   the log, so events a change stream failed to deliver are applied anyway. Only moves forward,
--   and not at all while a catch-up scan is unfinished.
ALTER TABLE {schema}.checkpoints ADD COLUMN IF NOT EXISTS last_event_at timestamptz;
ALTER TABLE {schema}.checkpoints ADD COLUMN IF NOT EXISTS scan_from timestamptz;
