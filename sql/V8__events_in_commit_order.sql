-- Events in commit order, written only by the triggers, with writers that
-- never wait on each other.
--
-- Until V7 each event took its id when its row was written and was
-- NOTIFYed at commit: PostgreSQL serializes every notifying commit through
-- the WAL flush (its NOTIFY lock), and per-deployment advisory locks kept
-- one deployment's ids in commit order, at the price of deadlocks between
-- writers of two deployments in opposite orders and of writers waiting for
-- an idle transaction. Now:
--
-- 1. An event is written at commit, by a DEFERRABLE INITIALLY DEFERRED
--    constraint trigger: its id is taken while its transaction commits, so
--    ids follow commit order (for two transactions whose commits overlap,
--    the order in which they began to commit). A transaction idle after its
--    writes has taken no id and holds nothing anyone waits for. No lock of
--    our own is taken; REPEATABLE READ and SERIALIZABLE writers fail only
--    where they would without the triggers.
-- 2. Ids come from windflow_event_ids, a sequence no column owns, so
--    TRUNCATE ... RESTART IDENTITY cannot make them start again; a TRUNCATE
--    of the log marks everything up to the last id as pruned, so resumes
--    from before it get resync.
-- 3. The server reads the log in id order (src/db/feed.rs) and delivers an
--    id only once every smaller id has committed or can no longer commit,
--    so a resume is "every event after id N", exact on any instance.
-- 4. The NOTIFY is only a wake-up: a committing transaction NOTIFYs its
--    events unless another transaction is committing events at that very
--    moment (it holds the row of windflow_wakeup), whose wake-up covers it:
--    notifying commits no longer queue behind each other. Only rows of the
--    log are events, so there is no signature and no key: a NOTIFY from
--    anyone else makes the server read the log once, nothing more.
-- 5. Writers' rights. The trigger functions run as the owner of the log
--    (SECURITY DEFINER) with search_path pinned to pg_catalog, the schema
--    of these objects, then pg_temp: nothing a writer can create (a temp
--    table, a function, its own search_path) stands in for ours.
-- 6. Replays ask the log for what a viewer may see by index: by owner and
--    by organization, beside the per-deployment index.
-- 7. The logical event source is gone (its reasons, a cheaper commit and
--    commit order from the WAL, are what 1 to 4 give every database).

-- The old way: signed NOTIFY per event, per-deployment locks, two sources.
DROP TRIGGER deployments_events ON deployments;
DROP TRIGGER deployment_logs_events ON deployment_logs;
DROP FUNCTION windflow_deployment_events();
DROP FUNCTION windflow_deployment_log_events();
DROP FUNCTION windflow_emit(text, deployments, json);
DROP FUNCTION windflow_lock_deployment(uuid);
DROP TABLE windflow_notify_key;
DROP TABLE windflow_event_source;
DROP PUBLICATION IF EXISTS windflow_events;

-- Ids from a sequence of its own, continuing where the identity stopped.
-- CACHE 1 (the default): ids are handed out in the order they are asked for,
-- across sessions.
CREATE SEQUENCE windflow_event_ids AS bigint;
DO $$
DECLARE
    identity regclass := pg_get_serial_sequence('windflow_events', 'id')::regclass;
    last     bigint := greatest(
        coalesce(pg_sequence_last_value(identity), 0),
        coalesce((SELECT max(id) FROM windflow_events), 0),
        (SELECT upto FROM windflow_events_pruned));
BEGIN
    IF last > 0 THEN
        PERFORM setval('windflow_event_ids', last);
    END IF;
END
$$;
ALTER TABLE windflow_events ALTER COLUMN id DROP IDENTITY;
ALTER TABLE windflow_events ALTER COLUMN id SET DEFAULT nextval('windflow_event_ids');
-- The writing transaction served the catch-up's snapshots; ids now do.
ALTER TABLE windflow_events DROP COLUMN xid;

-- What a viewer may see, by index (a replay of deployment_events reads only
-- the viewer's events, however large the log).
CREATE INDEX windflow_events_user_id_idx ON windflow_events (user_id, id);
CREATE INDEX windflow_events_organization_id_idx ON windflow_events (organization_id, id)
    WHERE organization_id IS NOT NULL;

-- The wake-up: one row, locked by the transaction whose commit NOTIFYs.
CREATE TABLE windflow_wakeup (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton)
);
INSERT INTO windflow_wakeup DEFAULT VALUES;
REVOKE ALL ON windflow_wakeup FROM PUBLIC;

-- Record one event, at commit (called by the trigger functions below only).
CREATE FUNCTION windflow_record(
    event_type text, deployment_id uuid, user_id uuid, organization_id uuid, event_data json)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    event_id bigint;
    payload  text;
BEGIN
    INSERT INTO windflow_events (type, deployment_id, user_id, organization_id, data)
    VALUES (event_type, deployment_id, user_id, organization_id, event_data)
    RETURNING id INTO event_id;
    -- Another transaction committing events now will wake the servers.
    PERFORM FROM windflow_wakeup FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- Whole when it fits NOTIFY's 8000 bytes (psql's LISTEN shows it); the
    -- server reads every event from the log anyway.
    IF octet_length(event_data::text) < 7500 THEN
        payload := json_build_object(
            'event_id', event_id, 'type', event_type, 'deployment_id', deployment_id,
            'user_id', user_id, 'organization_id', organization_id, 'data', event_data)::text;
    END IF;
    IF payload IS NULL OR octet_length(payload) >= 8000 THEN
        payload := json_build_object(
            'event_id', event_id, 'type', event_type, 'deployment_id', deployment_id,
            'user_id', user_id, 'organization_id', organization_id)::text;
    END IF;
    PERFORM pg_notify('windflow_events', payload);
END
$$;
REVOKE EXECUTE ON FUNCTION windflow_record(text, uuid, uuid, uuid, json) FROM PUBLIC;

CREATE FUNCTION windflow_deployment_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        PERFORM windflow_record('DEPLOYMENT_STATUS_CHANGED', NEW.id, NEW.user_id, NEW.organization_id,
            json_build_object(
                'deployment_id', NEW.id,
                'status', NEW.status,
                'old_status', CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END,
                'timestamp', windflow_utc(NEW.updated_at),
                'user_id', NEW.user_id,
                'name', NEW.name,
                'error_message', NEW.error_message));
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.progress, NEW.current_step, NEW.total_steps)
            IS DISTINCT FROM (OLD.progress, OLD.current_step, OLD.total_steps) THEN
        PERFORM windflow_record('DEPLOYMENT_PROGRESS', NEW.id, NEW.user_id, NEW.organization_id,
            json_build_object(
                'deployment_id', NEW.id,
                'progress', NEW.progress,
                'current_step', NEW.current_step,
                'total_steps', NEW.total_steps,
                'timestamp', windflow_utc(NEW.updated_at)));
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION windflow_deployment_log_events() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    owner        uuid;
    organization uuid;
BEGIN
    -- The deployment as this transaction sees it.
    SELECT d.user_id, d.organization_id INTO owner, organization FROM deployments d WHERE d.id = NEW.deployment_id;
    IF NOT FOUND THEN
        -- Deleted later in this same transaction (the cascade took the line too):
        -- nothing to tell anyone.
        IF NOT EXISTS (SELECT FROM deployment_logs l WHERE l.id = NEW.id) THEN
            RETURN NULL;
        END IF;
        RAISE EXCEPTION 'deployment % is not visible to this transaction''s snapshot', NEW.deployment_id
            USING HINT = 'insert its logs from a transaction that started after the deployment was created';
    END IF;
    PERFORM windflow_record('DEPLOYMENT_LOGS_UPDATE', NEW.deployment_id, owner, organization,
        json_build_object(
            'deployment_id', NEW.deployment_id,
            'logs', NEW.message,
            'timestamp', windflow_utc(NEW.created_at),
            'append', true));
    RETURN NULL;
END
$$;

-- At commit, row by row in the order of the writes.
CREATE CONSTRAINT TRIGGER deployments_created_events
    AFTER INSERT ON deployments DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION windflow_deployment_events();
CREATE CONSTRAINT TRIGGER deployments_changed_events
    AFTER UPDATE ON deployments DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW
    WHEN (NEW.status IS DISTINCT FROM OLD.status
          OR (NEW.progress, NEW.current_step, NEW.total_steps)
             IS DISTINCT FROM (OLD.progress, OLD.current_step, OLD.total_steps))
    EXECUTE FUNCTION windflow_deployment_events();
CREATE CONSTRAINT TRIGGER deployment_logs_events
    AFTER INSERT ON deployment_logs DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION windflow_deployment_log_events();

-- A TRUNCATE of the log deletes events: resumes from before it get resync.
CREATE FUNCTION windflow_events_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    UPDATE windflow_events_pruned
       SET upto = greatest(upto, (SELECT last_value FROM windflow_event_ids));
    RETURN NULL;
END
$$;
CREATE TRIGGER windflow_events_truncated
    AFTER TRUNCATE ON windflow_events
    FOR EACH STATEMENT EXECUTE FUNCTION windflow_events_truncated();

-- Writers' own trigger, run with the writer's rights: nothing it calls may
-- resolve through the writer's search_path.
CREATE OR REPLACE FUNCTION windflow_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := pg_catalog.now();
    RETURN NEW;
END
$$;

-- Pin the search_path of every function that runs as the owner: pg_catalog,
-- then this schema, then pg_temp (last, so a temp table never stands in for
-- ours). windflow_record and windflow_utc run only inside them, with theirs.
DO $$
DECLARE
    f text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'windflow_deployment_events()',
        'windflow_deployment_log_events()',
        'windflow_events_truncated()'
    ] LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = pg_catalog, %I, pg_temp', f, current_schema());
    END LOOP;
END
$$;
