-- Notifications get one home: a trigger on audit.entries queues one for each
-- entry new to the history, whether the stream, the backfill after a lost slot
-- or failover, or the reconciler's repair put it there. The stream consumer
-- no longer writes the outbox itself (entries the backfill copied got none);
-- a consumer of the code before, still running, writes a notification the
-- trigger has already queued in its transaction, which ON CONFLICT drops.

-- An entry's notification, queued in the outbox as the entry reaches the
-- history, by whichever path: the stream (`rewards audit run`), the backfill
-- after the consumer made its slot again (an invalidated slot, a failover, a
-- new node) or the reconciler's repair. This is the one place a notification
-- is made, so every path makes the same one, and it is made once per entry:
-- a row already in the history is skipped by its insert's ON CONFLICT DO
-- NOTHING and fires nothing (an entry streamed again after its delivered
-- notification was forgotten is not notified twice), and the outbox is keyed
-- by the entry too.
CREATE FUNCTION audit._queue_notification()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO audit.notifications (user_id, entry_id, kind, payload)
    VALUES (NEW.user_id, NEW.entry_id, NEW.kind, jsonb_build_object(
        'id', NEW.user_id || ':' || NEW.entry_id,  -- the receiver drops repeats on it
        'type', 'points.' || NEW.kind,
        'user_id', NEW.user_id,
        'entry_id', NEW.entry_id,
        'amount', NEW.amount,
        'balance', jsonb_build_object('available', NEW.available_after, 'reserved', NEW.reserved_after),
        'reservation_id', NEW.reservation_id,
        'created_at', NEW.created_at))
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END;
$$;

-- The kinds the app's notification service hears about.
CREATE TRIGGER entries_queue_notification
    AFTER INSERT ON audit.entries
    FOR EACH ROW WHEN (NEW.kind IN ('credit', 'debit', 'commit', 'expire', 'mature', 'lapse'))
    EXECUTE FUNCTION audit._queue_notification();

ALTER FUNCTION audit._queue_notification() OWNER TO rewards_owner;
REVOKE ALL ON FUNCTION audit._queue_notification() FROM PUBLIC;
