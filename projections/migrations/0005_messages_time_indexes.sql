-- The operator dashboard's per-minute series (api/dashboard/reporting.py) and the soak's latency
-- figures read the last minutes of `messages` by accepted_at and by billed_at, across tenants:
-- messages_tenant_accepted (tenant_id first) cannot serve that range, so without these every poll
-- scanned the whole table. Created inside the migration's transaction (no CONCURRENTLY): on a large
-- existing table the projector waits while they build.
CREATE INDEX IF NOT EXISTS messages_accepted_at ON {schema}.messages (accepted_at);
CREATE INDEX IF NOT EXISTS messages_billed_at ON {schema}.messages (billed_at) WHERE billed_at IS NOT NULL;
