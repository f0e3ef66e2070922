-- Burrow's transactional outbox and inbox (PostgreSQL 13 or later).
--
-- Idempotent: run it again at any time (`burrow outbox init` does, in one transaction).
-- The tables go into the first schema of the search path; `burrow outbox init` creates the
-- schema `burrow` (or BURROW_OUTBOX_SCHEMA) and runs this file there. By hand:
--
--   psql "$DSN" -v ON_ERROR_STOP=1 -1 -c 'CREATE SCHEMA IF NOT EXISTS burrow' \
--        -c 'SET search_path TO burrow' -f outbox.sql
--
-- service/_outbox/schema.sql is the source; deploy/postgres/outbox.sql is a copy of it.

-- The outbox: one row per message written in the user's transaction, published by the relay.
CREATE TABLE IF NOT EXISTS outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The ordering key: rows of one key are published in the order they were written.
    key           text NOT NULL,
    -- The relay partition of the key (each partition is held by one relay at a time; the
    -- relays take it with a session advisory lock). 16: service/_outbox/schema.py PARTITIONS.
    part          smallint GENERATED ALWAYS AS ((hashtext(key) & 2147483647) % 16) STORED,
    kind          text NOT NULL,                  -- event | command (the publish kind)
    exchange      text NOT NULL,
    routing_key   text NOT NULL,
    message_id    text NOT NULL,                  -- fixed here: a re-publish is a duplicate
    properties    jsonb NOT NULL DEFAULT '{}',    -- type, correlation_id, persistent, ...
    headers       jsonb NOT NULL DEFAULT '{}',    -- bytes as {"$b": base64}
    body          bytea NOT NULL,
    due_at        timestamptz,                    -- delayed: delivered at this time
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp(),  -- the insert (relay lag)
    xid           xid8 NOT NULL DEFAULT pg_current_xact_id(),  -- the writing transaction
    sent_at       timestamptz,                    -- confirmed by the broker
    attempts      integer NOT NULL DEFAULT 0,
    parked_at     timestamptz,                    -- never published: see parked_reason
    parked_reason text
);

-- The relay's scan: the rows neither sent nor parked, oldest first.
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id)
    WHERE sent_at IS NULL AND parked_at IS NULL;
-- The retention purge of sent rows.
CREATE INDEX IF NOT EXISTS outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;

-- The inbox: the message ids a consumer has handled, committed with the handler's writes.
CREATE TABLE IF NOT EXISTS inbox (
    consumer      text NOT NULL,                  -- the operation or subscription
    message_id    text NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    reply         bytea,                          -- a call's reply, given again to a duplicate
    PRIMARY KEY (consumer, message_id)
);

-- The retention purge of inbox ids.
CREATE INDEX IF NOT EXISTS inbox_received ON inbox (received_at);

-- Wake the relays: one notification per inserting statement, delivered at commit.
CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    RETURN NULL;
END
$$;

DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_trigger
        WHERE tgname = 'outbox_notify' AND tgrelid = 'outbox'::regclass
    ) THEN
        CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
            FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
    END IF;
END
$$;
