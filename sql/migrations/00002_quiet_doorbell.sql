-- The doorbell rings only when a relay may be listening for it.
--
-- An unconditional NOTIFY serialises every inserting transaction's commit on
-- one cluster-wide lock (PreCommit_Notify), which halves createuser's
-- throughput under load. While a relay is draining it holds the advisory lock
-- hashtext('outbox.relay.busy') exclusively; the trigger's WHEN clause then
-- fails its try-lock and skips both the plpgsql call and the NOTIFY. A busy
-- relay does not need the doorbell: when it stops draining it waits for every
-- transaction that was in progress and drains once more (see the relay's
-- drainer), so no insert is left waiting for the fallback poll.
--
-- The shared lock the WHEN clause takes is held until the inserting
-- transaction ends, so a relay that wants the exclusive lock waits for
-- in-flight inserters that did ring, and new try-locks fail while its request
-- is queued: inserters never wait, and never starve the relay.

-- +goose Up
DROP TRIGGER outbox_notify ON outbox;
CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT
    WHEN (pg_try_advisory_xact_lock_shared(hashtext('outbox.relay.busy')))
    EXECUTE FUNCTION outbox_notify();

-- +goose Down
DROP TRIGGER outbox_notify ON outbox;
CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT
    EXECUTE FUNCTION outbox_notify();
