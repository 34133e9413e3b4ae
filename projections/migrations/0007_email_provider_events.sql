-- E-mail providers' later events (core/domain/email_events.py): `delivered`, `bounced` (data.bounce_type
-- hard | soft) and `complained` go to message_events, daily_stats and messages like every event; this
-- view puts them side by side per route and UTC day (documented for users in docs/reporting.md).
-- `{schema}` is replaced by the quoted schema name before execution.

-- The hard/soft split is not in daily_stats (its key is the event type): read from the bounces alone.
CREATE INDEX IF NOT EXISTS message_events_bounced ON {schema}.message_events (route_id, at) WHERE type = 'bounced';

CREATE OR REPLACE VIEW {schema}.email_provider_daily AS
WITH counts AS (
    SELECT day, route_id,
           coalesce(sum(events) FILTER (WHERE state = 'sent'), 0)::bigint AS sent,
           coalesce(sum(events) FILTER (WHERE state = 'delivered'), 0)::bigint AS delivered,
           coalesce(sum(events) FILTER (WHERE state = 'bounced'), 0)::bigint AS bounced,
           coalesce(sum(events) FILTER (WHERE state = 'complained'), 0)::bigint AS complained
    FROM {schema}.daily_stats
    WHERE channel = 'email' AND state IN ('sent', 'delivered', 'bounced', 'complained')
    GROUP BY day, route_id
), bounces AS (
    SELECT (at AT TIME ZONE 'UTC')::date AS day, coalesce(route_id, '') AS route_id,
           count(*) FILTER (WHERE data->>'bounce_type' = 'hard') AS hard,
           count(*) FILTER (WHERE data->>'bounce_type' = 'soft') AS soft
    FROM {schema}.message_events
    WHERE type = 'bounced' AND channel = 'email'
    GROUP BY 1, 2
)
SELECT c.day, c.route_id, c.sent, c.delivered, c.bounced,
       coalesce(b.hard, 0)::bigint AS hard_bounced, coalesce(b.soft, 0)::bigint AS soft_bounced, c.complained,
       round(c.delivered::numeric / nullif(c.sent, 0), 4) AS delivery_rate,
       round(c.bounced::numeric / nullif(c.sent, 0), 4) AS bounce_rate,
       round(coalesce(b.hard, 0)::numeric / nullif(c.sent, 0), 4) AS hard_bounce_rate,
       round(c.complained::numeric / nullif(c.delivered, 0), 4) AS complaint_rate
FROM counts c LEFT JOIN bounces b ON b.day = c.day AND b.route_id = c.route_id;
