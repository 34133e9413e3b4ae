-- The opt-out list (core/domain/consent.py): its changes and its current state (documented for users
-- in docs/reporting.md). `{schema}` is replaced by the quoted schema name before execution.
-- A suppression entry is an event stream of its own in the log (message_id "sup:..."), not a
-- message: its `opted_out` / `opted_in` events go to message_events and daily_stats like every
-- event, and to suppression_changes below, but no longer make a row in `messages`.

-- One row per `opted_out` / `opted_in` event, inserted exactly once like `inbound`.
CREATE TABLE IF NOT EXISTS {schema}.suppression_changes (
    message_id   text NOT NULL,
    seq          integer NOT NULL,
    tenant_id    text NOT NULL,
    channel      text NOT NULL,
    address      text NOT NULL,
    scope        text NOT NULL,
    change       text NOT NULL,
    source       text,
    actor        text,
    reason       text,
    keyword      text,
    changed_at   timestamptz NOT NULL,
    PRIMARY KEY (message_id, seq)
);
CREATE INDEX IF NOT EXISTS suppression_changes_tenant ON {schema}.suppression_changes (tenant_id, changed_at);

-- Each entry's newest change: `active` while its newest change is an opt-out.
CREATE OR REPLACE VIEW {schema}.suppressions AS
SELECT DISTINCT ON (message_id)
       tenant_id, channel, address, scope, change = 'opted_out' AS active, changed_at, source, actor, reason,
       keyword
FROM {schema}.suppression_changes
ORDER BY message_id, seq DESC;

-- Backfill from the audit copy, and drop the `messages` rows the entries made before this version.
INSERT INTO {schema}.suppression_changes (message_id, seq, tenant_id, channel, address, scope, change, source,
                                          actor, reason, keyword, changed_at)
SELECT message_id, seq, tenant_id, channel, data->>'address', data->>'scope', type, data->>'source',
       data->>'actor', data->>'reason', data->>'keyword', at
FROM {schema}.message_events WHERE type IN ('opted_out', 'opted_in')
ON CONFLICT (message_id, seq) DO NOTHING;

DELETE FROM {schema}.messages WHERE state IN ('opted_out', 'opted_in');
