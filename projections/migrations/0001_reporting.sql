-- Reporting schema (CQRS read side), written only by the projector (projections/projector.py).
-- `{schema}` is replaced by the quoted schema name (psycopg.sql.Identifier) before execution.
-- Every table here is derived data: `msgcore projections rebuild` recreates it from the event log.

CREATE SCHEMA IF NOT EXISTS {schema};

-- One row per message: its current state and the time each stage was first reached.
-- Rows only move forward: an event whose seq <= last_seq never changes state or last_seq (it may
-- still fill a stage timestamp that is NULL). `billed` does not replace the delivery state; it sets
-- billed / billed_at / amount_minor / currency instead. `updated_at` is the `at` of the newest event
-- applied (not the wall clock), so a fresh replay yields identical rows.
CREATE TABLE IF NOT EXISTS {schema}.messages (
    message_id            text PRIMARY KEY,
    tenant_id             text NOT NULL,
    campaign_id           text,
    channel               text NOT NULL DEFAULT 'sms',
    route_id              text,
    state                 text,          -- type of the newest non-billing event; NULL only if none seen
    last_seq              integer NOT NULL DEFAULT 0,
    to_number             text,
    sender                text,
    encoding              text,
    parts                 integer,
    price_per_part_minor  bigint,
    currency              text,
    accepted_at           timestamptz,
    routed_at             timestamptz,
    sent_at               timestamptz,
    delivered_at          timestamptz,   -- receipt time: delivered, undelivered or expired
    failed_at             timestamptz,
    billed                boolean NOT NULL DEFAULT false,
    billed_at             timestamptz,
    amount_minor          bigint,        -- integer minor units (1 = 0.01 EUR)
    smsc_message_id       text,          -- first part's id from `sent`, or the receipt's id
    error_code            integer,       -- from the newest retry/failed event
    attempts              integer NOT NULL DEFAULT 0,
    updated_at            timestamptz
);
CREATE INDEX IF NOT EXISTS messages_tenant_accepted ON {schema}.messages (tenant_id, accepted_at);
CREATE INDEX IF NOT EXISTS messages_campaign ON {schema}.messages (campaign_id) WHERE campaign_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_state ON {schema}.messages (tenant_id, state);

-- The audit copy of the event log, one row per event, inserted once (ON CONFLICT DO NOTHING).
-- route_id is the event's route_id or, when absent, data.route_id.
CREATE TABLE IF NOT EXISTS {schema}.message_events (
    message_id  text NOT NULL,
    seq         integer NOT NULL,
    type        text NOT NULL,
    at          timestamptz NOT NULL,
    tenant_id   text NOT NULL,
    route_id    text,
    channel     text NOT NULL DEFAULT 'sms',
    data        jsonb NOT NULL DEFAULT '{{}}',
    PRIMARY KEY (message_id, seq)
);
CREATE INDEX IF NOT EXISTS message_events_tenant_at ON {schema}.message_events (tenant_id, at);

-- Events per UTC day x tenant x route x channel x event type. Incremented only by events that were
-- actually inserted into message_events, so at every commit it equals exactly:
--   SELECT (at AT TIME ZONE 'UTC')::date AS day, tenant_id, coalesce(route_id, '') AS route_id,
--          channel, type AS state, count(*) AS events,
--          coalesce(sum((data->>'parts')::bigint) FILTER (WHERE type IN ('accepted','sent','billed')), 0),
--          coalesce(sum((data->>'amount')::bigint) FILTER (WHERE type = 'billed'), 0)
--   FROM message_events GROUP BY 1, 2, 3, 4, 5;
-- (projections/queries.py recount_daily_stats runs that query; `msgcore verify` compares them.)
CREATE TABLE IF NOT EXISTS {schema}.daily_stats (
    day           date NOT NULL,
    tenant_id     text NOT NULL,
    route_id      text NOT NULL DEFAULT '',
    channel       text NOT NULL DEFAULT 'sms',
    state         text NOT NULL,
    events        bigint NOT NULL DEFAULT 0,
    parts         bigint NOT NULL DEFAULT 0,
    amount_minor  bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, tenant_id, route_id, channel, state)
);

-- Where each projection stands in the change stream, written in the same transaction as the rows.
-- resume_token: the change stream token (MongoDB extended JSON) to resume after; NULL right after
--   a replay, in which case cluster_time says where the change stream must start.
-- cluster_time: BSON Timestamp of the replay's start or of the newest applied change,
--   encoded as (seconds << 32) | increment.
CREATE TABLE IF NOT EXISTS {schema}.checkpoints (
    projection      text PRIMARY KEY,
    resume_token    jsonb,
    cluster_time    bigint,
    events_applied  bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
