-- Billing ledger, inbound messages and the BI views (documented for users in docs/reporting.md).
-- `{schema}` is replaced by the quoted schema name (psycopg.sql.Identifier) before execution.
-- Like every table here, these are derived data: a fresh replay of the log recreates them.

-- One row per `billed` event, inserted by the projector in the same transaction as the event's row
-- in message_events and only when that row was newly inserted (so exactly once).
-- campaign_id is the message's campaign from its `accepted` event (filled in later should the bill
-- be projected before the `accepted` event).
CREATE TABLE IF NOT EXISTS {schema}.billing_ledger (
    message_id            text NOT NULL,
    seq                   integer NOT NULL,
    tenant_id             text NOT NULL,
    route_id              text,
    campaign_id           text,
    billed_at             timestamptz NOT NULL,
    parts                 integer NOT NULL,
    price_per_part_minor  bigint NOT NULL,
    amount_minor          bigint NOT NULL,
    currency              text NOT NULL,
    PRIMARY KEY (message_id, seq)
);
CREATE INDEX IF NOT EXISTS billing_ledger_tenant_billed ON {schema}.billing_ledger (tenant_id, billed_at);
CREATE INDEX IF NOT EXISTS billing_ledger_campaign ON {schema}.billing_ledger (campaign_id)
    WHERE campaign_id IS NOT NULL;

-- One row per `inbound` event (a mobile-originated message), same exactly-once rule.
CREATE TABLE IF NOT EXISTS {schema}.inbound (
    message_id       text NOT NULL,
    seq              integer NOT NULL,
    tenant_id        text NOT NULL,
    route_id         text,
    channel          text NOT NULL DEFAULT 'sms',
    from_number      text,
    to_number        text,
    text             text,
    received_at      timestamptz NOT NULL,
    reply_to         text,
    smsc_message_id  text,
    PRIMARY KEY (message_id, seq)
);
CREATE INDEX IF NOT EXISTS inbound_tenant_received ON {schema}.inbound (tenant_id, received_at);
CREATE INDEX IF NOT EXISTS inbound_reply_to ON {schema}.inbound (reply_to) WHERE reply_to IS NOT NULL;

-- Backfill from the audit copy, for schemas projected before this migration existed. Run while no
-- projector of an older version writes to the schema (or rebuild the schema instead).
INSERT INTO {schema}.billing_ledger AS l (message_id, seq, tenant_id, route_id, campaign_id, billed_at, parts,
                                         price_per_part_minor, amount_minor, currency)
SELECT e.message_id, e.seq, e.tenant_id, e.route_id, m.campaign_id, e.at, (e.data->>'parts')::integer,
       (e.data->>'price_per_part')::bigint, (e.data->>'amount')::bigint, e.data->>'currency'
FROM {schema}.message_events e LEFT JOIN {schema}.messages m ON m.message_id = e.message_id
WHERE e.type = 'billed'
ON CONFLICT (message_id, seq) DO NOTHING;

INSERT INTO {schema}.inbound (message_id, seq, tenant_id, route_id, channel, from_number, to_number, text,
                              received_at, reply_to, smsc_message_id)
SELECT message_id, seq, tenant_id, route_id, channel, data->>'from', data->>'to', data->>'text', at,
       data->>'reply_to', data->>'smsc_message_id'
FROM {schema}.message_events WHERE type = 'inbound'
ON CONFLICT (message_id, seq) DO NOTHING;

-- An operator's `requeued` puts a message back in state `retry` (as the fold does); older projector
-- versions wrote the event type instead.
UPDATE {schema}.messages SET state = 'retry' WHERE state = 'requeued';

-- Delivery rate per UTC day and route, from daily_stats (i.e. from the events of that day):
-- sent counts `sent` events (submit attempts the SMSC accepted), the others count receipts.
CREATE OR REPLACE VIEW {schema}.delivery_rate_daily AS
SELECT day,
       route_id,
       coalesce(sum(events) FILTER (WHERE state = 'sent'), 0)::bigint AS sent,
       coalesce(sum(events) FILTER (WHERE state = 'delivered'), 0)::bigint AS delivered,
       coalesce(sum(events) FILTER (WHERE state = 'undelivered'), 0)::bigint AS undelivered,
       coalesce(sum(events) FILTER (WHERE state = 'expired'), 0)::bigint AS expired,
       round(coalesce(sum(events) FILTER (WHERE state = 'delivered'), 0)::numeric
             / nullif(coalesce(sum(events) FILTER (WHERE state IN ('delivered', 'undelivered', 'expired')), 0), 0),
             4) AS delivery_rate
FROM {schema}.daily_stats
WHERE state IN ('sent', 'delivered', 'undelivered', 'expired')
GROUP BY day, route_id;

-- Messages per tenant by the UTC day they were accepted, with what they have cost so far.
CREATE OR REPLACE VIEW {schema}.tenant_volume_daily AS
SELECT (accepted_at AT TIME ZONE 'UTC')::date AS day,
       tenant_id,
       currency,
       count(*)::bigint AS accepted,
       coalesce(sum(parts), 0)::bigint AS parts,
       count(*) FILTER (WHERE billed)::bigint AS billed,
       coalesce(sum(amount_minor), 0)::bigint AS spend_minor
FROM {schema}.messages
WHERE accepted_at IS NOT NULL
GROUP BY 1, tenant_id, currency;

-- The same per UTC calendar month (`month` is its first day).
CREATE OR REPLACE VIEW {schema}.tenant_volume_monthly AS
SELECT date_trunc('month', accepted_at AT TIME ZONE 'UTC')::date AS month,
       tenant_id,
       currency,
       count(*)::bigint AS accepted,
       coalesce(sum(parts), 0)::bigint AS parts,
       count(*) FILTER (WHERE billed)::bigint AS billed,
       coalesce(sum(amount_minor), 0)::bigint AS spend_minor
FROM {schema}.messages
WHERE accepted_at IS NOT NULL
GROUP BY 1, tenant_id, currency;

-- Per campaign: how many of its messages are in each state now, and what they have cost.
CREATE OR REPLACE VIEW {schema}.campaign_progress AS
SELECT campaign_id,
       tenant_id,
       count(*)::bigint AS total,
       count(*) FILTER (WHERE state = 'accepted')::bigint AS accepted,
       count(*) FILTER (WHERE state = 'routed')::bigint AS routed,
       count(*) FILTER (WHERE state = 'sent')::bigint AS sent,
       count(*) FILTER (WHERE state = 'retry')::bigint AS retry,
       count(*) FILTER (WHERE state = 'unknown')::bigint AS unknown,
       count(*) FILTER (WHERE state = 'delivered')::bigint AS delivered,
       count(*) FILTER (WHERE state = 'undelivered')::bigint AS undelivered,
       count(*) FILTER (WHERE state = 'expired')::bigint AS expired,
       count(*) FILTER (WHERE state = 'failed')::bigint AS failed,
       count(*) FILTER (WHERE state = 'rejected')::bigint AS rejected,
       count(*) FILTER (WHERE state = 'canceled')::bigint AS canceled,
       count(*) FILTER (WHERE state = 'dead_lettered')::bigint AS dead_lettered,
       count(*) FILTER (WHERE state IN ('accepted', 'routed', 'sent', 'retry'))::bigint AS in_flight,
       count(*) FILTER (WHERE billed)::bigint AS billed,
       CASE WHEN count(DISTINCT currency) FILTER (WHERE billed) <= 1
            THEN coalesce(sum(amount_minor), 0) END::bigint AS billed_amount_minor,
       CASE WHEN count(DISTINCT currency) FILTER (WHERE billed) = 1
            THEN min(currency) FILTER (WHERE billed) END AS currency,
       min(accepted_at) AS first_accepted_at,
       max(updated_at) AS last_event_at
FROM {schema}.messages
WHERE campaign_id IS NOT NULL
GROUP BY campaign_id, tenant_id;

-- Accepted -> delivered latency per route and UTC day of delivery, for delivered messages.
CREATE OR REPLACE VIEW {schema}.route_latency AS
SELECT route_id,
       (delivered_at AT TIME ZONE 'UTC')::date AS day,
       count(*)::bigint AS delivered,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms) AS p50_ms,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms) AS p95_ms,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY latency_ms) AS p99_ms
FROM (SELECT route_id, delivered_at,
             (extract(epoch FROM delivered_at - accepted_at) * 1000)::double precision AS latency_ms
      FROM {schema}.messages
      WHERE state = 'delivered' AND accepted_at IS NOT NULL AND delivered_at IS NOT NULL) d
GROUP BY route_id, 2;
