-- messages.state_seq: the seq of the newest non-billing event applied to the row. `state` moves
-- forward by it alone, so a `billed` event applied before the receipt it follows (possible when the
-- catch-up scan fills a gap the change stream left) cannot hold the state back: the row still ends
-- equal to a fresh replay.
ALTER TABLE {schema}.messages ADD COLUMN IF NOT EXISTS state_seq integer NOT NULL DEFAULT 0;
UPDATE {schema}.messages m SET state_seq = e.seq
FROM (SELECT message_id, max(seq) AS seq FROM {schema}.message_events WHERE type <> 'billed' GROUP BY message_id) e
WHERE m.message_id = e.message_id AND m.state_seq < e.seq;
